"""MLA decode attention in Triton (CUDA): the absorbed form reading latent pages in place.

The cache of one layer is `[num_pages, page_size, R + P]` (kv_cache.py: the latent `c`, R values,
then the rope key, P values). A decode query, already absorbed into latent space (mla.py:
`[q_nope W_UK, q_pe]`, `[B, H, R + P]`), scores every cached token with one dot over both parts;
the output is the softmax-weighted sum of the latents `c`, `[B, H, R]` (W_UV is applied after).

One program per (request, block of 16 heads, split of the sequence): the heads of a block share
each latent tile, so with DeepSeek-V2-Lite's 16 heads each request's latent is read once. Splits
(as in triton_attention.decode) give a small batch enough programs; their partial outputs merge
by log-sum-exp in torch. Shapes depend on the batch only, and the pages come as the Triton
attention context lists them, so the decode CUDA graphs capture it. R and P must be powers
of two >= 16 (`supports`). TRITON_INTERPRET=1 before import runs it on CPU tensors (tests).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cluster.engine.triton_attention import LOG2E, num_decode_splits

BLOCK_H = 16


@triton.jit
def _mla_decode_split_kernel(Q, CACHE, PAGES, PAGE_START, SEQ_LENS, PART_O, PART_LSE, qk_scale, num_splits, num_heads,
                             stride_qb, stride_qh, stride_page,
                             PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    live = h < num_heads
    r = tl.arange(0, R)
    p = tl.arange(0, P)
    q_row = Q + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh
    q_c = tl.load(q_row + r[None, :], mask=live[:, None], other=0.0)
    q_p = tl.load(q_row + R + p[None, :], mask=live[:, None], other=0.0)
    pages = PAGES + tl.load(PAGE_START + b)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(pages + t // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row = page * stride_page + (t % PAGE_SIZE) * (R + P)
        c = tl.load(CACHE + row[:, None] + r[None, :], mask=valid[:, None], other=0.0)
        pe = tl.load(CACHE + row[:, None] + R + p[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION) + tl.dot(q_p, tl.trans(pe), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))              # [BLOCK_H, BLOCK_N], base 2
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        prob = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(prob, 1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(c.dtype), c, input_precision=PRECISION)
        m = m_new
    # NOTE: a split past the end of a short request is empty: lse -inf, weight 0 in the merge
    lse = tl.where(total > 0, m + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
    part = (b * num_heads + h) * num_splits + split                               # [B, H, S] row
    tl.store(PART_O + part.to(tl.int64)[:, None] * R + r[None, :], acc / tl.maximum(total, 1e-30)[:, None],
             mask=live[:, None])
    tl.store(PART_LSE + part, lse, mask=live)


def supports(kv_lora_rank: int, rope_dim: int) -> bool:
    return all(n >= 16 and n & (n - 1) == 0 for n in (kv_lora_rank, rope_dim))


def decode_latent(q: torch.Tensor, cache: torch.Tensor, pages: torch.Tensor, page_start: torch.Tensor,
                  seq_lens: torch.Tensor, scale: float, kv_lora_rank: int, num_splits: int = 0) -> torch.Tensor:
    """q `[B, H, R + P]` (absorbed), cache `[num_pages, page_size, R + P]`, request b's pages
    `pages[page_start[b]:]` covering `seq_lens[b]` tokens (int64, the Triton attention context's
    layout) -> softmax-weighted latents `[B, H, R]` in q's dtype."""
    b, h, d = q.shape
    page_size = cache.shape[1]
    r = kv_lora_rank
    splits = num_splits or num_decode_splits(b, triton.cdiv(h, BLOCK_H), q.device)
    part_o = torch.empty(b, h, splits, r, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    _mla_decode_split_kernel[(b, triton.cdiv(h, BLOCK_H), splits)](
        q, cache, pages, page_start, seq_lens, part_o, part_lse, scale * LOG2E, splits, h,
        q.stride(0), q.stride(1), cache.stride(0),
        PAGE_SIZE=page_size, R=r, P=d - r, BLOCK_H=BLOCK_H, BLOCK_N=32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    weights = torch.softmax(part_lse * math.log(2), dim=-1)                      # base-2 lse -> natural
    return (part_o * weights[..., None]).sum(dim=2).to(q.dtype)
