"""Paged attention: write the new tokens' KV into their pages, attend over each request's pages.

On CUDA the "triton" backend (triton_attention.py) reads the pages in place for decode and for
extends over a cached prefix. The rest of this file is the "torch" backend (CPU, or CUDA without
Triton) described next.

Cache layout per layer (see kv_cache.py): K and V are each `[num_kv_heads, num_pages, page_size,
head_dim]`, so one (head, page) is a contiguous `page_size * head_dim` row. Decode gathers
those rows per request into a small buffer and runs grouped-query attention as batched
matmuls (the G query heads of a KV head share one K/V read, no repeat of K/V): on CUDA all
heads and requests at once (few large kernels); on CPU the scores over (head, request) pairs in
cache-sized chunks of gathered K, and P @ V as one `embedding_bag` that reads V's rows in place. Prompts that
start at position 0 attend to their fresh K/V directly through SDPA's causal kernel; an
extend over a cached prefix (chunked prefill, prefix reuse, DLLM blocks) gathers the
prefix from the pages and uses an explicit mask.

All metadata of one forward travels in one `AttentionContext` (attention_context.py); layers
share everything derived from it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F

from cluster.engine.attention_context import AttentionContext

__all__ = ["AttentionContext", "paged_attention", "decode_attention", "attention_backend"]

DECODE_CHUNK_BYTES = 8 << 20   # K bytes gathered per decode chunk and thread (fewer, larger ops win; fits L3)
BACKEND_SWITCH = "PDCLUSTER_ATTENTION"   # "torch": no Triton kernels on CUDA
BATCHED_DECODE: Optional[bool] = None   # None: batched on CUDA, chunked on CPU; tests force either path


def attention_backend(device, head_dim: int) -> str:
    """"triton" on CUDA where Triton is installed and the head size suits its kernels
    (`PDCLUSTER_ATTENTION=torch` forces the torch path), else "torch"."""
    if torch.device(device).type != "cuda" or os.environ.get(BACKEND_SWITCH, "") == "torch":
        return "torch"
    if head_dim < 16 or head_dim & (head_dim - 1) or importlib.util.find_spec("triton") is None:
        return "torch"
    return "triton"


def use_batched_decode(cache: torch.Tensor) -> bool:
    """Decode all KV heads and requests in one gather and two bmm (GPU: launches dominate), or per
    head in chunks whose K/V stay in the CPU caches (CPU)."""
    return cache.is_cuda if BATCHED_DECODE is None else BATCHED_DECODE


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             ctx: AttentionContext) -> None:
    """k, v: [T, kv_heads, D] into the flat slots of the layer's cache."""
    kvh, num_pages, page_size, d = k_cache.shape
    if k.dtype != k_cache.dtype:   # `[model] kv_dtype` (bfloat16 under float32 activations)
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(kvh, num_pages * page_size, d).index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
    v_cache.view(kvh, num_pages * page_size, d).index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))


def _kv_rows(cache: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """Row ids into the cache viewed as `[kv_heads * num_pages, page_size * D]`, ordered (head, request, page).

    Gathering whole rows along dim 0 copies full pages (~7x faster on CPU than selecting
    along the page dim of the 4-D cache). Built by the first layer, reused by all layers.
    """
    if ctx.kv_index is None:
        kvh, num_pages = cache.shape[:2]
        heads = torch.arange(kvh, device=cache.device)[:, None] * num_pages
        ctx.kv_index = (heads + ctx.page_table.view(1, -1)).view(-1)
    return ctx.kv_index


def gather_kv(cache: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """[kv_heads, num_pages, page_size, D] -> [kv_heads, B, P * page_size, D] contiguous."""
    kvh, num_pages, page_size, d = cache.shape
    b, p = ctx.page_table.shape
    rows = cache.view(kvh * num_pages, page_size * d).index_select(0, _kv_rows(cache, ctx))
    return rows.view(kvh, b, p * page_size, d)


def gather_kv_pair(k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext):
    """-> K, V `[B, kv_heads, P * page_size, D]`, each contiguous, ordered (request, head) so the
    batched decode needs no transpose copy of q or of its output. One gather for both when V
    follows K in memory (the KVPool layout); the index is built by the first layer."""
    kvh, num_pages, page_size, d = k_cache.shape
    b, p = ctx.page_table.shape
    if ctx.kv_pair_index is None:
        heads = torch.arange(kvh, device=k_cache.device)[None, :, None] * num_pages
        rows = (ctx.page_table[:, None, :] + heads).view(-1)
        ctx.kv_pair_index = torch.cat((rows, rows + kvh * num_pages))
    row = page_size * d
    shape = (b, kvh, p * page_size, d)
    if (k_cache.is_contiguous() and v_cache.is_contiguous()
            and v_cache.data_ptr() == k_cache.data_ptr() + k_cache.numel() * k_cache.element_size()):
        both = k_cache.as_strided((2 * kvh * num_pages, row), (row, 1)).index_select(0, ctx.kv_pair_index)
        return both.view(2, *shape).unbind(0)
    rows = ctx.kv_pair_index[:b * kvh * p]
    return (k_cache.view(-1, row).index_select(0, rows).view(shape),
            v_cache.view(-1, row).index_select(0, rows).view(shape))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
                     scale: float) -> torch.Tensor:
    """One query per request; GQA as batched matmuls `[.., G, D] @ [.., D, L]`, softmax in float32."""
    if ctx.backend == "triton":
        from cluster.engine import triton_attention
        return triton_attention.decode(q, k_cache, v_cache, ctx.pages, ctx.page_start, ctx.seq_lens, scale)
    if k_cache.dtype != q.dtype:   # `[model] kv_dtype`: a bfloat16 KV cache under float32 activations
        if ctx.kv_span is not None:
            return _decode_span_lowp(q, k_cache, v_cache, *ctx.kv_span, scale)
        return decode_attention(q.to(k_cache.dtype), k_cache, v_cache, ctx, scale).to(q.dtype)
    if ctx.kv_span is not None:
        return _decode_span(q, k_cache, v_cache, *ctx.kv_span, scale)
    if ctx.mask.dtype != q.dtype:   # cast once per forward, not per layer
        ctx.mask = ctx.mask.to(q.dtype)
    if use_batched_decode(k_cache):
        return _decode_batched(q, k_cache, v_cache, ctx, scale)
    return _decode_chunked(q, k_cache, v_cache, ctx, scale)


def _decode_batched(q, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """All heads and requests at once: 7 kernels per layer (bf16), whatever the batch."""
    num_reqs, num_heads, d = q.shape
    kvh = k_cache.shape[0]
    qg = q.mul(scale).view(num_reqs, kvh, num_heads // kvh, d)                     # [B, kvh, G, D]
    keys, values = gather_kv_pair(k_cache, v_cache, ctx)                           # [B, kvh, L, D]
    scores = torch.matmul(qg, keys.transpose(-1, -2)).add_(ctx.mask.unsqueeze(1))  # [B, kvh, G, L]
    if q.dtype == torch.float32:
        probs = scores.softmax(dim=-1)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values).view(num_reqs, num_heads * d)


def _decode_span(q, k_cache, v_cache, first_page: int, seq_len: int, scale: float) -> torch.Tensor:
    """One request whose pages are consecutive: its K and V are `[kv_heads, seq_len, D]` views of the cache
    (no gather, no mask, no padding keys), GQA as two matmuls; half the CPU time of the chunked path."""
    num_heads, d = q.shape[1], q.shape[2]
    kvh, _, page_size, _ = k_cache.shape
    n = -(-seq_len // page_size)
    keys = k_cache[:, first_page:first_page + n].reshape(kvh, n * page_size, d)[:, :seq_len]
    values = v_cache[:, first_page:first_page + n].reshape(kvh, n * page_size, d)[:, :seq_len]
    scores = torch.matmul(q.view(kvh, num_heads // kvh, d).mul(scale), keys.transpose(1, 2))   # [kvh, G, L]
    probs = scores.softmax(dim=-1) if q.dtype == torch.float32 else scores.float().softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(1, num_heads * d)


def lowp_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """q `[kv_heads, 1, G, D]` rounded to the KV dtype, keys, values `[kv_heads, L, D]` -> `[kv_heads, 1, G, D]`
    in the KV dtype: torch's fused CPU kernel (float32 inside), 2x faster here than bfloat16 bmm."""
    return F.scaled_dot_product_attention(q, keys.unsqueeze(1), values.unsqueeze(1), scale=scale)


def _decode_span_lowp(q, k_cache, v_cache, first_page: int, seq_len: int, scale: float) -> torch.Tensor:
    """`_decode_span` over a KV cache in a lower dtype than q: q rounded to it, `lowp_attention`, back to q's
    dtype (the flat CPU loop's arithmetic: cpu_decode.SpanViews)."""
    num_heads, d = q.shape[1], q.shape[2]
    kvh, _, page_size, _ = k_cache.shape
    n = -(-seq_len // page_size)
    keys = k_cache[:, first_page:first_page + n].reshape(kvh, n * page_size, d)[:, :seq_len]
    values = v_cache[:, first_page:first_page + n].reshape(kvh, n * page_size, d)[:, :seq_len]
    qg = q.view(kvh, 1, num_heads // kvh, d).to(k_cache.dtype)
    return lowp_attention(qg, keys, values, scale).view(1, num_heads * d).to(q.dtype)


def _v_token_rows(v_cache: torch.Tensor, ctx: AttentionContext, group: int) -> torch.Tensor:
    """`[kv_heads * B * G, L]` row ids into the V cache viewed as token rows `[kv_heads * num_pages * page_size, D]`:
    one bag per (head, request, query head) for `embedding_bag`. Built by the first layer, reused by all."""
    if ctx.v_token_rows is None:
        kvh, num_pages, page_size, _ = v_cache.shape
        b, p = ctx.page_table.shape
        offsets = torch.arange(page_size, device=v_cache.device)
        slots = (ctx.page_table[:, :, None] * page_size + offsets).view(1, b, 1, p * page_size)
        heads = torch.arange(kvh, device=v_cache.device)[:, None, None, None] * (num_pages * page_size)
        rows = (heads + slots).expand(kvh, b, group, p * page_size).reshape(kvh * b * group, -1)
        ctx.v_token_rows = rows.int() if kvh * num_pages * page_size < 2 ** 31 else rows   # int32: half the bytes
    return ctx.v_token_rows


def _decode_chunked(q, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """Scores over chunks of (KV head, request) pairs small enough (~DECODE_CHUNK_BYTES of K per thread) that the
    gathered K is still in cache when the matmul reads it (heads and requests in one flat loop: a small batch is
    one gather and one matmul per layer); P @ V as one `embedding_bag` (weighted sums of V rows read where they
    lie: no V gather, and 2x faster than the M = G matmul on a gathered copy)."""
    num_reqs, num_heads, d = q.shape
    kvh, num_pages, page_size, _ = k_cache.shape
    group = num_heads // kvh
    p = ctx.page_table.shape[1]
    length = p * page_size
    pairs = kvh * num_reqs                                                        # (head, request), head-major
    qg = q.view(num_reqs, kvh, group, d).transpose(0, 1).mul(scale).reshape(pairs, group, d)
    rows = _kv_rows(k_cache, ctx)                                                 # [pairs * p], same order
    if ctx.head_mask is None:                                                     # the mask of each pair's request
        ctx.head_mask = ctx.mask.expand(kvh, num_reqs, 1, length).reshape(pairs, 1, length)
    chunk_bytes = DECODE_CHUNK_BYTES * torch.get_num_threads()
    per_chunk = max(1, min(pairs, chunk_bytes // (length * d * k_cache.element_size())))
    if ctx.kv_buffers is None or ctx.kv_buffers[0].shape[0] != per_chunk * p:
        ctx.kv_buffers = [k_cache.new_empty(per_chunk * p, page_size * d)]
    kbuf = ctx.kv_buffers[0]
    k_flat = k_cache.view(kvh * num_pages, page_size * d)
    scores = q.new_empty(pairs, group, length)
    for c0 in range(0, pairs, per_chunk):
        c1 = min(pairs, c0 + per_chunk)
        n = c1 - c0
        keys = torch.index_select(k_flat, 0, rows[c0 * p:c1 * p], out=kbuf[:n * p]).view(n, length, d)
        torch.baddbmm(ctx.head_mask[c0:c1].expand(n, group, length), qg[c0:c1], keys.transpose(1, 2),
                      out=scores[c0:c1])
    # bf16 / fp16: softmax in float32
    probs = scores.softmax(dim=-1) if q.dtype == torch.float32 else scores.float().softmax(dim=-1).to(q.dtype)
    out = F.embedding_bag(_v_token_rows(v_cache, ctx, group), v_cache.view(-1, d), mode="sum",
                          per_sample_weights=probs.view(-1, length))                   # [kvh * B * G, D]
    return out.view(kvh, num_reqs, group, d).transpose(0, 1).reshape(num_reqs, num_heads * d)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, kv_heads, D] (new tokens) -> [T, H * D]."""
    num_tokens, num_heads, d = q.shape
    write_kv(k_cache, v_cache, k, v, ctx)
    if ctx.is_decode:
        return decode_attention(q, k_cache, v_cache, ctx, scale)
    if ctx.kv_limit is not None:   # triton: an extend over cached pages
        from cluster.engine import triton_attention
        return triton_attention.extend(q, k_cache, v_cache, ctx.pages, ctx.page_start, ctx.q_start,
                                       ctx.extend_lens_t, ctx.kv_limit, ctx.max_q_len, scale)
    b, lq = ctx.num_reqs, ctx.max_q_len
    pad = (lambda x: x[ctx.q_index]) if ctx.q_index is not None else (lambda x: x.view(b, lq, *x.shape[1:]))
    if ctx.mask is None:   # prompts from position 0 see only their own new tokens: skip the cache read
        keys, values = pad(k).transpose(1, 2), pad(v).transpose(1, 2)                 # [B, kvh, Lq, D]
    else:
        keys, values = gather_kv(k_cache, ctx).transpose(0, 1), gather_kv(v_cache, ctx).transpose(0, 1)
        if keys.dtype != q.dtype:   # `[model] kv_dtype`: the cached prefix in its own dtype
            keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = F.scaled_dot_product_attention(pad(q).transpose(1, 2), keys, values, attn_mask=ctx.mask,
                                         is_causal=ctx.mask is None, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b * lq, num_heads * d)              # [B * Lq, H * D]
    return out[ctx.out_index] if ctx.out_index is not None else out
