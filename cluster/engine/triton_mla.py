"""MLA decode attention in Triton (CUDA): the absorbed form reading latent pages in place.

The cache of one layer is `[num_pages, page_size, R + P]` (kv_cache.py: the latent `c`, R values,
then the rope key, P values). A decode query, already absorbed into latent space (mla.py:
`q_nope W_UK` `[B, H, R]` and `q_pe` `[B, H, P]`, unit last strides), scores every cached token with one
dot over both parts; the output is the softmax-weighted sum of the latents `c`, `[B, H, R]`
(W_UV is applied after).

The work is bound by reading the latents once, so the layout serves that read:
- Heads share tiles: one program takes a block of 16 heads (DeepSeek-V2-Lite's all) and each
  `[BLOCK_N, R + P]` tile it loads feeds both of its dots for all of them (the latent is key and
  value at once), so a request's latent is read once per head block, not once per head.
- Split-K over the sequence (flash-decoding): program (request, head block, split) takes one
  contiguous, BLOCK_N-aligned slice of the request's tokens and writes its normalised partial
  output and base-2 log-sum-exp; a second kernel merges the splits of each (request, head).
  The split count fills about two programs per SM in one wave (`decode_splits`) and depends on
  the batch shape only, never on lengths, so a decode CUDA graph captures a fixed grid; a split
  past the end of a short request is empty and weighs 0 in the merge.
- The partials are float32 and few (splits x R per head, against a slice's tokens x (R + P)); with
  one split (large batches) the split kernel writes the output itself and no merge runs.
R and P must be powers of two >= 16 (`supports`). TRITON_INTERPRET=1 before import runs it on CPU
tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.engine.triton_attention import LOG2E, MAX_SPLITS, _num_sms, _precision

BLOCK_H = 16      # tl.dot's smallest M; heads beyond a block's are masked
BLOCK_N = 32      # tokens per tile: 32 x 576 bf16 = 36 KB, two stages fit shared memory
PROGRAMS_PER_SM = 2


@triton.jit
def _mla_split_kernel(QC, QP, CACHE, PAGES, PAGE_START, SEQ_LENS, PART_O, PART_LSE, qk_scale, num_splits, num_heads,
                      stride_qcb, stride_qch, stride_qpb, stride_qph, stride_page,
                      PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    live = h < num_heads
    r = tl.arange(0, R)
    p = tl.arange(0, P)
    b64 = b.to(tl.int64)
    q_c = tl.load(QC + b64 * stride_qcb + h[:, None] * stride_qch + r[None, :], mask=live[:, None], other=0.0)
    q_p = tl.load(QP + b64 * stride_qpb + h[:, None] * stride_qph + p[None, :], mask=live[:, None], other=0.0)
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
    lse = tl.where(total > 0, m + tl.log2(tl.maximum(total, 1e-30)), float("-inf"))
    part = (b * num_heads + h) * num_splits + split                               # [B, H, S] row
    out = acc / tl.maximum(total, 1e-30)[:, None]
    tl.store(PART_O + part.to(tl.int64)[:, None] * R + r[None, :], out.to(PART_O.dtype.element_ty), mask=live[:, None])
    tl.store(PART_LSE + part, lse, mask=live)


@triton.jit
def _mla_merge_kernel(PART_O, PART_LSE, OUT, num_splits, R: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                                          # b * H + h
    s = tl.arange(0, SPLITS)
    r = tl.arange(0, R)
    top = tl.max(tl.load(PART_LSE + row * num_splits + s, mask=s < num_splits, other=float("-inf")), 0)
    top = tl.where(top == float("-inf"), 0.0, top)   # an empty request (graph padding): weights 0, output 0
    acc = tl.zeros([R], tl.float32)
    total = top * 0.0
    for i in range(num_splits):
        w = tl.exp2(tl.load(PART_LSE + row * num_splits + i) - top)
        acc += w * tl.load(PART_O + (row * num_splits + i) * R + r)
        total += w
    tl.store(OUT + row * R + r, (acc / tl.maximum(total, 1e-30)).to(OUT.dtype.element_ty))


def supports(kv_lora_rank: int, rope_dim: int) -> bool:
    return all(n >= 16 and n & (n - 1) == 0 for n in (kv_lora_rank, rope_dim))


def decode_splits(batch: int, head_blocks: int, device: torch.device) -> int:
    """Splits per (request, head block) so the grid is about PROGRAMS_PER_SM per SM in one wave."""
    return max(1, min(MAX_SPLITS, PROGRAMS_PER_SM * _num_sms(device) // (batch * head_blocks)))


def decode_latent(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, pages: torch.Tensor,
                  page_start: torch.Tensor, seq_lens: torch.Tensor, scale: float, num_splits: int = 0,
                  block_n: int = BLOCK_N, num_stages: int = 2) -> torch.Tensor:
    """q_latent `[B, H, R]` and q_pe `[B, H, P]` (absorbed; unit last stride), cache
    `[num_pages, page_size, R + P]`, request b's pages `pages[page_start[b]:]` covering `seq_lens[b]`
    tokens (int64, the Triton attention context's layout) -> softmax-weighted latents `[B, H, R]`
    (contiguous) in q's dtype. `num_splits`, `block_n`, `num_stages`: tuning overrides (moe_gpu.py)."""
    b, h, r = q_latent.shape
    p = q_pe.shape[-1]
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    head_blocks = triton.cdiv(h, BLOCK_H)
    splits = num_splits or decode_splits(b, head_blocks, q_latent.device)
    out = torch.empty(b, h, r, dtype=q_latent.dtype, device=q_latent.device)
    # one split (a large batch): its normalised output is the answer, written in place, no merge
    part_o = out if splits == 1 else torch.empty(b, h, splits, r, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q_latent.device)
    _mla_split_kernel[(b, head_blocks, splits)](
        q_latent, q_pe, cache, pages, page_start, seq_lens, part_o, part_lse, scale * LOG2E, splits, h,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0),
        PAGE_SIZE=cache.shape[1], R=r, P=p, BLOCK_H=BLOCK_H, BLOCK_N=block_n,
        PRECISION=_precision(q_latent.dtype), num_warps=4, num_stages=num_stages)
    if splits > 1:
        _mla_merge_kernel[(b * h,)](part_o, part_lse, out, splits, R=r, SPLITS=triton.next_power_of_2(splits),
                                    num_warps=4)
    return out
