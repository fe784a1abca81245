"""The batched decode path (CUDA's: all heads and requests at once) against the chunked CPU path, one
request's KV read in place against the gathered path, and the launch-saving rewrites of RoPE and RMSNorm against the formulas they replace. All on CPU."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cluster.engine import attention
from cluster.engine.attention import AttentionContext, decode_attention
from cluster.engine.loader import load_model
from cluster.engine.model import RMSNorm
from cluster.engine.model_runner import ModelRunner
from cluster.engine.rotary import RotaryEmbedding, apply_rope, inv_frequencies
from tests.engine_fixtures import batch_input, prefill_input

pytestmark = pytest.mark.usefixtures("single_thread")


class NoTokenizer:
    eos_token_ids = frozenset()


def _decode_context(seq_lens, page_size, num_pages):
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(num_pages - 1, generator=g) + 1   # scattered pages, page 0 left as padding
    tables, at = [], 0
    for s in seq_lens:
        n = -(-s // page_size)
        tables.append(order[at:at + n].tolist())
        at += n
    return AttentionContext.build([1] * len(seq_lens), [s - 1 for s in seq_lens], tables, [0] * len(seq_lens),
                                  page_size, True, "cpu")


@pytest.mark.parametrize("adjacent_kv", [True, False])
@pytest.mark.parametrize("chunk_bytes", [1, 8 << 20])   # one request per chunk / all in one chunk
def test_batched_decode_attention_equals_chunked(monkeypatch, adjacent_kv, chunk_bytes):
    monkeypatch.setattr(attention, "DECODE_CHUNK_BYTES", chunk_bytes)
    kvh, group, d, page_size, num_pages = 2, 3, 16, 4, 40
    seq_lens = [1, 7, 16, 30, 5]
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, kvh, num_pages, page_size, d, generator=g)
    k_cache, v_cache = (kv[0], kv[1]) if adjacent_kv else (kv[0].clone(), kv[1].clone())
    q = torch.randn(len(seq_lens), kvh * group, d, generator=g)
    out = {}
    for batched in (False, True):
        monkeypatch.setattr(attention, "BATCHED_DECODE", batched)
        out[batched] = decode_attention(q, k_cache, v_cache, _decode_context(seq_lens, page_size, num_pages), 0.25)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_len", [1, 5, 16, 30])
def test_one_request_on_consecutive_pages_reads_kv_in_place_like_the_gathered_path(seq_len):
    kvh, group, d, page_size, num_pages = 2, 3, 16, 4, 40
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(2, kvh, num_pages, page_size, d, generator=g)
    q = torch.randn(1, kvh * group, d, generator=g)
    pages = list(range(9, 9 + -(-seq_len // page_size)))
    span = AttentionContext.build([1], [seq_len - 1], [pages], [0], page_size, True, "cpu")
    table = np.array([pages + [0, 0]], dtype=np.int64)   # the persistent batch's padded row
    assert span.kv_span == (9, seq_len)
    assert AttentionContext.build_decode(np.array([seq_len - 1]), table, page_size, "cpu").kv_span == (9, seq_len)
    gathered = dataclasses.replace(span, kv_span=None)
    torch.testing.assert_close(decode_attention(q, kv[0], kv[1], span, 0.25),
                               decode_attention(q, kv[0], kv[1], gathered, 0.25), atol=1e-6, rtol=1e-6)


def test_scattered_pages_or_several_requests_gather_their_kv():
    assert AttentionContext.build([1], [6], [[3, 5]], [0], 4, True, "cpu").kv_span is None
    assert AttentionContext.build([1, 1], [2, 2], [[1], [2]], [0, 0], 4, True, "cpu").kv_span is None


def _mixed_batch_decode(runner: ModelRunner, prompts: list[list[int]], num_steps: int):
    """Prefill each prompt alone, then decode all of them together: tokens and logits of every step."""
    tables = [runner.page_allocator.allocate(-(-(len(p) + num_steps) // runner.page_size)) for p in prompts]
    last = [int(runner.forward(prefill_input(p, t)).next_token_ids[0]) for p, t in zip(prompts, tables)]
    lens = [len(p) for p in prompts]
    tokens, logits = [last], []
    for _ in range(num_steps):
        fi = batch_input([[t] for t in last], lens, tables, is_decode=True)
        fi.return_logits = True
        out = runner.forward(fi)
        last, lens = out.next_token_ids.tolist(), [n + 1 for n in lens]
        tokens.append(last)
        logits.append(out.logits)
    for t in tables:
        runner.page_allocator.free(t)
    return tokens, torch.stack(logits)


def test_batched_decode_path_gives_same_tokens_and_logits_as_cpu_path(monkeypatch):
    loaded = load_model("tiny-llama", load_format="dummy")
    loaded._tokenizer = NoTokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # dummy weights (std 0.02) barely attend: make the context change the tokens
        for name, p in loaded.model.named_parameters():
            if not name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    runner = ModelRunner(loaded, num_pages=64, page_size=4)
    prompts = [[(11 * i + 7 * j) % 900 + 3 for j in range(n)] for i, n in enumerate((3, 17, 8, 1, 29))]
    results = {}
    for batched in (False, True):
        monkeypatch.setattr(attention, "BATCHED_DECODE", batched)
        results[batched] = _mixed_batch_decode(runner, prompts, num_steps=6)
    assert results[True][0] == results[False][0]
    assert len({tuple(step) for step in results[False][0]}) > 1   # tokens move with the context
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-5, rtol=1e-5)
    runner.page_allocator.check_integrity(held=[])


def test_rope_on_fused_qk_heads_equals_hf_rotate_half():
    head_dim, scaling = 16, {"factor": 8.0, "original_max_position_embeddings": 32}
    rope = RotaryEmbedding(head_dim, 64, 10000.0, scaling)
    positions = torch.tensor([0, 5, 63, 17])
    x = torch.randn(4, 9, head_dim)[:, :6]   # a slice, as q and k sit inside the qkv output
    freqs = positions.float()[:, None] * inv_frequencies(head_dim, 10000.0, scaling)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    half = head_dim // 2
    hf = x * emb.cos() + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * emb.sin()
    assert torch.equal(apply_rope(x, *rope.lookup(positions, torch.float32)), hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_hf_formula_bit_for_bit_on_cpu(dtype):
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(dtype)
    x = (torch.randn(9, 64) * 3).to(dtype)
    xf = x.float()
    hf = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    assert torch.equal(norm(x), hf)
