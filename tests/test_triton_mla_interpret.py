"""The MLA decode kernel under Triton's CPU interpreter against gathered latents and a float32
softmax: requests of different lengths over scattered pages, all heads in one program or split
over several head blocks, several splits of a sequence (split-K) merged by log-sum-exp, more
splits than a short request fills (it uses fewer), single-token requests and lengths ending on a
page boundary. Skipped where Triton is missing and
on CUDA machines."""
import pytest
import torch

from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_mla")
RANK, ROPE, PAGE = 32, 16, 4


def _reference(q, cache, tables, lens, scale):
    out = []
    for b, (table, n) in enumerate(zip(tables, lens)):
        lat = cache[table].reshape(-1, RANK + ROPE)[:n]                  # [n, R + P]
        probs = torch.softmax((q[b] @ lat.T) * scale, dim=-1)
        out.append(probs @ lat[:, :RANK])
    return torch.stack(out)


@pytest.mark.parametrize("heads, lens, splits, block_h", [
    (4, [1, 13, 40], 0, 0),       # the split count chosen from the batch shape
    (20, [7, 33], 4, 32),         # all 20 heads in one 32-row program, 12 rows masked
    (20, [7, 33], 4, 0),          # float32: two head blocks of 16, the second partly masked
    (40, [50], 2, 64),            # a 64-row head block
    (16, [2, 30], 8, 0),          # more splits than a short request has tiles: it uses fewer
    (16, [1, 1], 3, 0),           # single tokens: one split used of three
    (8, [64, 32, 96], 3, 0),      # page-boundary lengths; 96 tokens over 3 splits of one tile each
    (16, [5, 9], 1, 0),           # one split: written in place, no merge
    (2, [100], 32, 0)])           # the most splits, one request
def test_interpreted_mla_decode_matches_gathered_latents(kernels, heads, lens, splits, block_h):
    g = torch.Generator().manual_seed(heads)
    num_pages = sum(-(-n // PAGE) for n in lens) + 4
    cache = torch.randn(num_pages, PAGE, RANK + ROPE, generator=g)
    perm = torch.randperm(num_pages, generator=g).tolist()
    width = max(-(-n // PAGE) for n in lens)
    tables, start = [], 0
    for n in lens:
        need = -(-n // PAGE)
        tables.append(perm[start:start + need] + [0] * (width - need))   # padded with page 0, as the torch context
        start += need
    q = torch.randn(len(lens), heads, RANK + ROPE, generator=g)
    flat = torch.tensor([p for t in tables for p in t])                 # the padded table, row by row
    starts = torch.arange(0, len(lens) * width, width)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, flat, starts, torch.tensor(lens), 0.125,
                                num_splits=splits, block_h=block_h)
    want = _reference(q, cache, [t[:-(-n // PAGE)] for t, n in zip(tables, lens)], lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_merge_by_the_last_split_gives_the_same_latents_launch_after_launch(kernels):
    """The last split of each (request, head block) to finish merges them; the counters it keeps
    are zero again afterwards, so a second launch (a graph replay) merges as the first did."""
    g = torch.Generator().manual_seed(5)
    lens = [70, 3, 0, 33]                 # four splits used, one, none (padding), three
    cache = torch.randn(48, PAGE, RANK + ROPE, generator=g)
    table = torch.randperm(48, generator=g)
    starts = torch.tensor([0, 18, 19, 20])
    q = torch.randn(4, 20, RANK + ROPE, generator=g)     # float32: two head blocks of 16
    want = _reference(q[[0, 1, 3]], cache, [table[:18], table[18:19], table[20:29]], [70, 3, 33], 0.125)
    for _ in range(2):
        got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, starts, torch.tensor(lens), 0.125,
                                    num_splits=4, fused_merge=True)
        torch.testing.assert_close(got[[0, 1, 3]], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[2], torch.zeros_like(got[2]))
        assert not kernels._merge_counters(q.device).any()


@pytest.mark.parametrize("block_n, tune", [(16, {}), (64, {}), (16, {"tokens_major": True}),
                                           (32, {"tokens_major": True}), (32, {"reload_q": True}),
                                           (16, {"page_rows": True}), (32, {"page_rows": True, "tokens_major": True}),
                                           (16, {"prefetch_pages": True}),
                                           (32, {"prefetch_pages": True, "page_rows": True, "fused_merge": True}),
                                           (32, {"float32_partials": True}), (16, {"r_chunks": 2}),
                                           (32, {"r_chunks": 2, "prefetch_pages": True, "page_rows": True}),
                                           (16, {"r_chunks": 2, "fused_merge": True})])
def test_tile_dot_orientation_page_reads_and_query_reload_overrides_give_the_same_latents(kernels, block_n, tune):
    """Each variant over requests of 30 and 90 tokens in three splits (tiles of 16 to 64 tokens over
    pages of 4): page ids per page or per token, read with the tile or two tiles ahead (the last
    tiles' look-ahead past the request's end reads nothing), the latent axis in chunks of 16."""
    g = torch.Generator().manual_seed(block_n)
    cache = torch.randn(40, PAGE, RANK + ROPE, generator=g)
    q = torch.randn(2, 4, RANK + ROPE, generator=g)
    lens, table = [30, 90], torch.randperm(40, generator=g)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, torch.tensor([0, 8]), torch.tensor(lens),
                                0.125, num_splits=3, block_n=block_n, num_stages=1, **tune)
    want = _reference(q, cache, [table[:8], table[8:31]], lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tokens_major_with_64_token_tiles_is_refused(kernels):
    """It gave wrong latents on an H100 in bfloat16 (and was never the faster orientation)."""
    q, cache = torch.randn(1, 4, RANK + ROPE), torch.randn(4, PAGE, RANK + ROPE)
    with pytest.raises(ValueError, match="block_n <= 32"):
        kernels.DecodeConfig(block_n=64, tokens_major=True)
    with pytest.raises(ValueError, match="block_n <= 32"):
        kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, torch.tensor([0]), torch.tensor([0]),
                              torch.tensor([1]), 0.125, block_n=64, tokens_major=True)


@pytest.mark.parametrize("splits", [1, 2])
def test_empty_request_gives_zeros_not_nan(kernels, splits):
    """A decode graph's padding rows have no tokens: their output must stay finite."""
    cache = torch.randn(4, PAGE, RANK + ROPE)
    q = torch.randn(1, 4, RANK + ROPE)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, torch.tensor([0]), torch.tensor([0]),
                                torch.tensor([0]), 0.125, num_splits=splits)
    assert torch.equal(got, torch.zeros_like(got))


def test_head_block_holds_every_head_up_to_64(kernels):
    assert [kernels.head_block(h) for h in (1, 16, 20, 64, 128)] == [16, 16, 32, 64, 64]
    assert kernels.head_block(128, torch.float32) == 16


def test_kernel_supports_only_power_of_two_parts(kernels):
    assert kernels.supports(512, 64) and not kernels.supports(16, 4) and not kernels.supports(48, 16)


@pytest.mark.parametrize("splits", [1, 3])
def test_half_precision_cache_gives_half_latents_close_to_float32(kernels, splits):
    """16-bit models: float32 partials (or the one split written in place) rounded once to q's dtype.
    float16 stands for bfloat16 here: the interpreter holds bfloat16 as raw uint16, which its dot
    cannot multiply (the CUDA tests cover bfloat16)."""
    g = torch.Generator().manual_seed(splits)
    cache = torch.randn(16, PAGE, RANK + ROPE, generator=g)
    q = torch.randn(2, 16, RANK + ROPE, generator=g)
    lens, table = [9, 30], torch.arange(16)
    half = cache.to(torch.float16), q.to(torch.float16)
    got = kernels.decode_latent(half[1][..., :RANK], half[1][..., RANK:], half[0], table, torch.tensor([0, 8]),
                                torch.tensor(lens), 0.125, num_splits=splits)
    want = _reference(half[1].float(), half[0].float(), [table[:3], table[8:16]], lens, 0.125)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads, block_h, chunks", [(20, 32, 2), (40, 64, 2), (16, 16, 1)])
def test_latent_axis_in_chunks_gives_the_latents_of_plain_dots(kernels, heads, block_h, chunks):
    """r_chunks: the query, tiles and accumulator cut along the latent axis (3-D dots), put back in
    order at the end; masked heads of a partial block stay out."""
    g = torch.Generator().manual_seed(heads + chunks)
    cache = torch.randn(40, PAGE, RANK + ROPE, generator=g)
    q = torch.randn(2, heads, RANK + ROPE, generator=g)
    lens, table = [30, 90], torch.randperm(40, generator=g)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, torch.tensor([0, 8]), torch.tensor(lens),
                                0.125, num_splits=2, block_h=block_h, r_chunks=chunks)
    want = _reference(q, cache, [table[:8], table[8:31]], lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
