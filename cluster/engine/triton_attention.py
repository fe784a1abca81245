"""Paged attention kernels in Triton (CUDA): decode with split KV, and extend over a paged prefix.

Both read K/V in place from the pages (`[kv_heads, num_pages, page_size, D]` per layer, see
kv_cache.py) through a flat page list: request b's pages are `pages[page_start[b]:]`, in order,
covering its `seq_lens[b]` tokens. Nothing is gathered, and a request costs only its own length
(no padding to the longest). The shapes a kernel sees depend on the batch size only, so a
CUDA graph captured per batch bucket serves every context length.

- Decode: one program per (request, KV head, split). The G query heads of a KV head share each
  K/V tile (GQA: one read for G heads, as a `[G, D] @ [D, N]` dot); each split keeps an online
  softmax over its share of the sequence and a second kernel merges the splits by their
  log-sum-exp. Splits give a small batch enough programs to fill the GPU.
- Extend: one program per (block of new tokens, request, query head), online softmax over the
  request's keys up to each token's visibility limit `kv_limit` (exclusive; causal: position + 1,
  DLLM blocks and SDAR blocks see further). The new tokens' K/V are already in their pages.

Softmax runs in float32 in base 2 (`exp2`, scale folded with log2(e)). Setting TRITON_INTERPRET=1
before this module is imported runs the kernels on CPU tensors (tests).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(Q, K, V, PAGES, PAGE_START, SEQ_LENS, PART_O, PART_LSE, qk_scale, num_splits,
                         stride_qb, stride_qh, stride_kh, stride_kp,
                         PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    head = kh * GROUP + g
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=g[:, None] < GROUP, other=0.0)
    k_head = K + kh.to(tl.int64) * stride_kh
    v_head = V + kh.to(tl.int64) * stride_kh
    page_list = PAGES + tl.load(PAGE_START + b)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(page_list + t // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row = page * stride_kp + (t % PAGE_SIZE) * D
        k = tl.load(k_head + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale          # [G, N], base 2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_head + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # NOTE: a split past the end of a short request is empty: lse -inf, skipped by the merge
    lse = tl.where(total > 0, m + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
    out = acc / tl.maximum(total, 1e-30)[:, None]
    part = (b * tl.num_programs(1) * GROUP + head) * num_splits + split               # [B, H, S] row
    tl.store(PART_O + part.to(tl.int64)[:, None] * D + d[None, :], out, mask=g[:, None] < GROUP)
    tl.store(PART_LSE + part, lse, mask=g < GROUP)


@triton.jit
def _decode_merge_kernel(PART_O, PART_LSE, OUT, num_splits, stride_ob,
                         D: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    row = (b * tl.num_programs(1) + h) * num_splits
    lse = tl.load(PART_LSE + row + s, mask=s < num_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))
    o = tl.load(PART_O + (row + s).to(tl.int64)[:, None] * D + d[None, :], mask=(s < num_splits)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * D + d, out.to(OUT.dtype.element_ty))


@triton.jit
def _extend_kernel(Q, K, V, OUT, PAGES, PAGE_START, Q_START, EXTEND_LENS, KV_LIMIT, qk_scale,
                   stride_qt, stride_qh, stride_kh, stride_kp, stride_ot,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D: tl.constexpr, PRECISION: tl.constexpr):
    mb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    ext = tl.load(EXTEND_LENS + b)
    if mb * BLOCK_M >= ext:
        return
    q0 = tl.load(Q_START + b)
    j = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    live = j < ext
    tok = (q0 + j).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + d[None, :], mask=live[:, None], other=0.0)
    limit = tl.load(KV_LIMIT + tok, mask=live, other=0)          # keys [0, limit) visible to each token
    kv_end = tl.max(limit, 0)
    kh = (h // GROUP).to(tl.int64)
    k_head = K + kh * stride_kh
    v_head = V + kh * stride_kh
    page_list = PAGES + tl.load(PAGE_START + b)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        t = n0 + tl.arange(0, BLOCK_N)
        in_seq = t < kv_end
        page = tl.load(page_list + t // PAGE_SIZE, mask=in_seq, other=0).to(tl.int64)
        row = page * stride_kp + (t % PAGE_SIZE) * D
        k = tl.load(k_head + row[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(t[None, :] < limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_head + row[:, None] + d[None, :], mask=in_seq[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(OUT + tok[:, None] * stride_ot + h * D + d[None, :], out.to(OUT.dtype.element_ty), mask=live[:, None])


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 16
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough (request, KV head, split) programs for about two waves on the GPU. Depends on the
    batch only (not on lengths), so a captured graph keeps its grid."""
    want = -(-2 * _num_sms(device) // (batch * num_kv_heads))
    return max(1, min(MAX_SPLITS, triton.next_power_of_2(want)))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # float32 models: no TF32 rounding


def _check(k_cache: torch.Tensor, d: int) -> None:
    if d & (d - 1) or d < 16:
        raise ValueError(f"Triton attention needs a power-of-two head_dim >= 16, got {d}")
    if k_cache.stride(-1) != 1 or k_cache.stride(-2) != d or k_cache.stride(1) != k_cache.shape[2] * d:
        raise ValueError("Triton attention needs pages of contiguous [page_size, head_dim] rows")


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
           page_start: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int = 0,
           block_n: int = 0, num_warps: int = 4) -> torch.Tensor:
    """q `[B, H, D]` (any strides with unit last stride), caches `[kv_heads, num_pages, page_size, D]`,
    pages / page_start / seq_lens int64 on the device -> `[B, H * D]` in q's dtype. `num_splits`,
    `block_n`, `num_warps`: tuning overrides (benchmarks/attention_kernels.py)."""
    b, h, d = q.shape
    kvh, _, page_size, _ = k_cache.shape
    _check(k_cache, d)
    group = h // kvh
    splits = num_splits or num_decode_splits(b, kvh, q.device)
    part_o = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    block_n = block_n or 64   # H200, 256 x 1024 tokens: 64 beats 32 by 11% at head_dim 128
    _decode_split_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, pages, page_start, seq_lens, part_o, part_lse, scale * LOG2E, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        PAGE_SIZE=page_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        D=d, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=2)
    out = torch.empty(b, h * d, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(b, h)](part_o, part_lse, out, splits, out.stride(0), D=d,
                                 BLOCK_S=triton.next_power_of_2(splits), num_warps=2)
    return out


def extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
           page_start: torch.Tensor, q_start: torch.Tensor, extend_lens: torch.Tensor, kv_limit: torch.Tensor, max_extend: int, scale: float) -> torch.Tensor:
    """q `[T, H, D]` of the new tokens, request by request (`q_start`, `extend_lens` per request);
    `kv_limit` per token -> `[T, H * D]`."""
    t, h, d = q.shape
    kvh, _, page_size, _ = k_cache.shape
    _check(k_cache, d)
    out = torch.empty(t, h * d, dtype=q.dtype, device=q.device)
    block_m = 64 if d <= 64 else 32
    grid = (triton.cdiv(max_extend, block_m), extend_lens.numel(), h)
    _extend_kernel[grid](q, k_cache, v_cache, out, pages, page_start, q_start, extend_lens, kv_limit,
                         scale * LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                         out.stride(0), PAGE_SIZE=page_size, GROUP=h // kvh, BLOCK_M=block_m, BLOCK_N=64, D=d,
                         PRECISION=_precision(q.dtype), num_warps=4, num_stages=2)
    return out
