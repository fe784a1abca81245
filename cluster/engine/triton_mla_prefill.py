"""MLA prefill and extend in Triton (CUDA): the expanded form over latent rows.

Over a cached prefix the caller expands every latent of the batch's pages once (`kv_b_proj`: per
head a key part `k_nope` and a value, `[rows, H, Dn + Dv]`; mla.py), with the rows in the order of
the Triton context's flat page list, so request b's token t is row `page_start[b] * page_size + t`.
A fresh prompt is the same loop over its new tokens' latents alone: `page_size` 1 and
`page_start = q_start`, each token seeing its request's rows up to itself. The rope key is the
latent's own tail (`[rows, P]`, one per token, shared by every head), never expanded.

One program per (block of BLOCK_M new tokens, request, head) keeps an online softmax (float32,
base 2) over the request's rows up to the block's furthest visibility limit, a score being
`q_nope . k_nope + q_pe . k_pe`; each token sees rows `[0, kv_limit)` (the context's limits:
causal, or further for DLLM and SDAR blocks), so new tokens and prefix alike are read where the
pages hold them, with no padding to the longest request and no mask tensor.
Widths must be powers of two >= 16 (`supports`). TRITON_INTERPRET=1 before import runs it on
CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.engine.triton_attention import LOG2E, _precision


@triton.jit
def _mla_extend_kernel(QN, QP, KV, KPE, OUT, PAGE_START, Q_START, EXT_LENS, KV_LIMIT, qk_scale,
                       stride_qnt, stride_qnh, stride_qpt, stride_qph, stride_kvt, stride_kvh, stride_kpe,
                       stride_ot, stride_oh, PAGE_SIZE: tl.constexpr, DN: tl.constexpr, P: tl.constexpr,
                       DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    ext = tl.load(EXT_LENS + b)
    if block * BLOCK_M < ext:
        i = block * BLOCK_M + tl.arange(0, BLOCK_M)
        live = i < ext
        tok = tl.load(Q_START + b) + i                                       # rows of the batch's new tokens
        limit = tl.load(KV_LIMIT + tok, mask=live, other=1)                  # a pad row sees row 0: no NaN
        kv_end = tl.max(limit, 0)
        dn = tl.arange(0, DN)
        p = tl.arange(0, P)
        dv = tl.arange(0, DV)
        q_n = tl.load(QN + tok[:, None] * stride_qnt + h * stride_qnh + dn[None, :], mask=live[:, None], other=0.0)
        q_p = tl.load(QP + tok[:, None] * stride_qpt + h * stride_qph + p[None, :], mask=live[:, None], other=0.0)
        first = tl.load(PAGE_START + b) * PAGE_SIZE                          # row of the request's token 0
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, DV], tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            t = n0 + tl.arange(0, BLOCK_N)
            inside = t < kv_end
            row = (first + t).to(tl.int64)
            kv_row = KV + row[:, None] * stride_kvt + h * stride_kvh
            k_n = tl.load(kv_row + dn[None, :], mask=inside[:, None], other=0.0)
            k_p = tl.load(KPE + row[:, None] * stride_kpe + p[None, :], mask=inside[:, None], other=0.0)
            v = tl.load(kv_row + DN + dv[None, :], mask=inside[:, None], other=0.0)
            s = tl.dot(q_n, tl.trans(k_n), input_precision=PRECISION)
            s += tl.dot(q_p, tl.trans(k_p), input_precision=PRECISION)
            s = tl.where(t[None, :] < limit[:, None], s * qk_scale, float("-inf"))   # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            prob = tl.exp2(s - m_new[:, None])
            total = total * alpha + tl.sum(prob, 1)
            acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / total[:, None]                                           # every row saw row 0: total > 0
        tl.store(OUT + tok[:, None] * stride_ot + h * stride_oh + dv[None, :], out.to(OUT.dtype.element_ty),
                 mask=live[:, None])


def supports(*widths: int) -> bool:
    return all(n >= 16 and n & (n - 1) == 0 for n in widths)


def extend_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                    page_start: torch.Tensor, q_start: torch.Tensor, extend_lens: torch.Tensor,
                    kv_limit: torch.Tensor, max_q_len: int, page_size: int, scale: float,
                    block_m: int = 0, block_n: int = 0) -> torch.Tensor:
    """q_nope `[T, H, Dn]` and q_pe `[T, H, P]` (the batch's new tokens, unit last stride); kv
    `[rows, H, Dn + Dv]` (expanded latents of the flat page list) and k_pe `[rows, P]` (unit last
    stride); request b's new tokens are rows `q_start[b]..+extend_lens[b]` of q, token t of its
    sequence row `page_start[b] * page_size + t` of kv, and token j sees rows `[0, kv_limit[j])`
    -> `[T, H, Dv]` in q's dtype. `block_m`, `block_n`: tuning overrides."""
    t, h, dn = q_nope.shape
    p, dv = q_pe.shape[-1], kv.shape[-1] - dn
    out = torch.empty(t, h, dv, dtype=q_nope.dtype, device=q_nope.device)
    wide = q_nope.dtype == torch.float32          # float32 tiles are twice the bytes: smaller blocks
    block_m = block_m or (32 if wide else 64)
    block_n = block_n or (32 if wide else 64)
    _mla_extend_kernel[(triton.cdiv(max_q_len, block_m), page_start.shape[0], h)](
        q_nope, q_pe, kv, k_pe, out, page_start, q_start, extend_lens, kv_limit, scale * LOG2E,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0), kv.stride(1),
        k_pe.stride(0), out.stride(0), out.stride(1), PAGE_SIZE=page_size, DN=dn, P=p, DV=dv,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q_nope.dtype), num_warps=4, num_stages=2)
    return out
