"""The MLA extend kernel under Triton's CPU interpreter against expanded keys and values with a
float32 softmax, on the Triton attention context the model runner builds: requests with cached
prefixes of different lengths over scattered pages, causal (each new token sees its prefix and
the new tokens up to itself), a prompt with no prefix beside them, blocks of new tokens shorter
than a kernel block, and DLLM's bidirectional tail. Skipped where Triton is missing and on CUDA."""
import pytest
import torch

from cluster.engine.attention_context import AttentionContext
from tests.paged_attention_cases import scattered_tables
from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_mla_prefill")
RANK, ROPE, NOPE, V, HEADS, PAGE = 32, 16, 16, 16, 3, 4


def _case(extend_lens, prefix_lens, bidirectional_lens, seed):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    num_pages = sum(-(-s // PAGE) for s in seq_lens) + 3
    tables = scattered_tables(torch.randperm(num_pages, generator=g).tolist(), seq_lens, PAGE)
    cache = torch.randn(num_pages, PAGE, RANK + ROPE, generator=g)
    w_kv = torch.randn(HEADS * (NOPE + V), RANK, generator=g) * 0.2
    t = sum(extend_lens)
    q_nope = torch.randn(t, HEADS, NOPE, generator=g)
    q_pe = torch.randn(t, HEADS, ROPE, generator=g)
    ctx = AttentionContext.build(extend_lens, prefix_lens, tables, bidirectional_lens, PAGE, False, "cpu",
                                 backend="triton")
    return cache, w_kv, q_nope, q_pe, tables, seq_lens, ctx


def _reference(cache, w_kv, q_nope, q_pe, tables, extend_lens, seq_lens, limits, scale):
    out, row = [], 0
    for table, e, s in zip(tables, extend_lens, seq_lens):
        lat = cache[table].reshape(-1, RANK + ROPE)[:s]
        kv = (lat[:, :RANK] @ w_kv.T).view(s, HEADS, NOPE + V)
        keys = torch.cat((kv[..., :NOPE], lat[:, None, RANK:].expand(s, HEADS, ROPE)), -1)     # [s, H, Dn + P]
        q = torch.cat((q_nope[row:row + e], q_pe[row:row + e]), -1)                            # [e, H, Dn + P]
        scores = torch.einsum("ehd,shd->hes", q, keys) * scale
        visible = torch.arange(s)[None, :] < limits[row:row + e, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
        out.append(torch.einsum("hes,shd->ehd", probs, kv[..., NOPE:]))
        row += e
    return torch.cat(out)


@pytest.mark.parametrize("extend_lens, prefix_lens, bidirectional_lens, block", [
    ([5, 9], [8, 13], [0, 0], 16),       # cached prefixes, one ending mid-page
    ([40, 3], [4, 0], [0, 0], 16),       # a prompt with no prefix beside one; 40 tokens: three query blocks
    ([6, 7], [20, 9], [0, 4], 16),       # DLLM: the second request's last 4 tokens see each other
    ([17], [33], [0], 32)])              # one request, larger blocks
def test_interpreted_mla_extend_matches_expanded_attention(kernels, extend_lens, prefix_lens, bidirectional_lens,
                                                           block):
    cache, w_kv, q_nope, q_pe, tables, seq_lens, ctx = _case(extend_lens, prefix_lens, bidirectional_lens,
                                                             sum(extend_lens))
    latents = cache.index_select(0, ctx.pages).view(-1, RANK + ROPE)              # as mla.py expands the pages
    kv = (latents[:, :RANK] @ w_kv.T).view(latents.shape[0], HEADS, NOPE + V)
    got = kernels.extend_expanded(q_nope, q_pe, kv, latents[:, RANK:], ctx.page_start, ctx.q_start,
                                  ctx.extend_lens_t, ctx.kv_limit, ctx.max_q_len, PAGE, 0.2,
                                  block_m=block, block_n=block)
    want = _reference(cache, w_kv, q_nope, q_pe, tables, extend_lens, seq_lens, ctx.kv_limit, 0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_strided_queries_as_the_model_splits_them(kernels):
    """q_nope and q_pe are views of one `[T, H, Dn + P]` projection (mla.py), not contiguous."""
    cache, w_kv, q_nope, q_pe, tables, seq_lens, ctx = _case([6], [10], [0], 3)
    q = torch.cat((q_nope, q_pe), -1)
    latents = cache.index_select(0, ctx.pages).view(-1, RANK + ROPE)
    kv = (latents[:, :RANK] @ w_kv.T).view(latents.shape[0], HEADS, NOPE + V)
    got = kernels.extend_expanded(q[..., :NOPE], q[..., NOPE:], kv, latents[:, RANK:], ctx.page_start, ctx.q_start,
                                  ctx.extend_lens_t, ctx.kv_limit, ctx.max_q_len, PAGE, 0.2, block_m=16, block_n=16)
    want = _reference(cache, w_kv, q_nope, q_pe, tables, [6], seq_lens, ctx.kv_limit, 0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
