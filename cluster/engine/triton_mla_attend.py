"""One MLA decode program's walk over its tokens (triton_mla.py's split kernel calls one of these):
the online softmax over tiles of cached latents, read in place from their pages, for a block of heads.

- `_attend_heads_major` (the default): heads are the dots' rows, `[H, R] @ [R, N]` then `[H, N] @ [N, R]`;
  every warp holds the whole query `[H, R]` as its dot operand.
- `_attend_split_r`: the same with the latent axis cut into R_CHUNKS chunks as a batch axis of 3-D dots,
  so a warp holds one chunk of the query and of the accumulator (fewer registers: no spills at 16 heads,
  room for more programs per SM); the chunks' partial scores are summed across warps once per tile.
- `_attend_tokens_major`: tokens and latent rows are the dots' rows (the Hopper tensor-core
  instruction's 64-row shape), the query waits in shared memory.
Each returns (max, sum, accumulator `[H, R]`) in base 2.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(pages, n0, end, stride_page, PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
          BLOCK_N: tl.constexpr, PAGE_ROWS: tl.constexpr):
    """Element offsets of tokens [n0, n0 + BLOCK_N)'s cache rows (page 0 past `end`). `PAGE_ROWS`:
    one page id per page of the tile (n0 and BLOCK_N multiples of PAGE_SIZE), else one per token."""
    if PAGE_ROWS:
        p = n0 // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        page = tl.load(pages + p, mask=p * PAGE_SIZE < end, other=0).to(tl.int64)
        row = page[:, None] * stride_page + (tl.arange(0, PAGE_SIZE) * (R + P))[None, :]
        return tl.reshape(row, [BLOCK_N])
    t = n0 + tl.arange(0, BLOCK_N)
    page = tl.load(pages + t // PAGE_SIZE, mask=t < end, other=0).to(tl.int64)
    return page * stride_page + (t % PAGE_SIZE) * (R + P)


@triton.jit
def _tile(CACHE, row, n0, end, R: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """(valid, latents `[BLOCK_N, R]`, rope keys `[BLOCK_N, P]`) of the tile at `row` offsets."""
    valid = n0 + tl.arange(0, BLOCK_N) < end
    c = tl.load(CACHE + row[:, None] + tl.arange(0, R)[None, :], mask=valid[:, None], other=0.0)
    pe = tl.load(CACHE + row[:, None] + R + tl.arange(0, P)[None, :], mask=valid[:, None], other=0.0)
    return valid, c, pe


@triton.jit
def _attend_heads_major(q_c, q_p, q_c_ptrs, live, CACHE, pages, start, end, stride_page, qk_scale,
                        PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, RELOAD_Q: tl.constexpr,
                        PAGE_ROWS: tl.constexpr, PREFETCH: tl.constexpr):
    """Online softmax over [start, end) with heads as the dots' rows: `[H, R] @ [R, N]`, then
    `[H, N] @ [N, R]`; -> (max, sum, accumulator `[H, R]`). `RELOAD_Q` reads the query again for
    every tile (from L1) instead of holding it in registers across the loop. `PREFETCH` reads a
    tile's page ids two tiles ahead (loop-carried), so the pipelined latent load of the next tile
    never waits on a page-id load issued in the same iteration."""
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    if PREFETCH:
        row = _rows(pages, start, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        ahead = _rows(pages, start + BLOCK_N, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
    for n0 in range(start, end, BLOCK_N):
        if PREFETCH:
            cur = row
            row = ahead
            ahead = _rows(pages, n0 + 2 * BLOCK_N, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        else:
            cur = _rows(pages, n0, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        valid, c, pe = _tile(CACHE, cur, n0, end, R, P, BLOCK_N)
        if RELOAD_Q:
            s = tl.dot(tl.load(q_c_ptrs, mask=live[:, None], other=0.0), tl.trans(c), input_precision=PRECISION)
        else:
            s = tl.dot(q_c, tl.trans(c), input_precision=PRECISION)
        s += tl.dot(q_p, tl.trans(pe), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))              # [BLOCK_H, BLOCK_N], base 2
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        prob = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(prob, 1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(c.dtype), c, input_precision=PRECISION)
        m = m_new
    return m, total, acc


@triton.jit
def _attend_tokens_major(q_c, q_p, CACHE, pages, start, end, stride_page, qk_scale, PAGE_SIZE: tl.constexpr,
                         R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         PRECISION: tl.constexpr, PAGE_ROWS: tl.constexpr):
    """The same with tokens and latent rows as the dots' rows (`[N, R] @ [R, H]`, then
    `[R, N] @ [N, H]`): with 64-token tiles both dots are 64 rows tall, the Hopper tensor-core
    instruction's height, and the query waits in shared memory rather than in registers."""
    q_ct = tl.trans(q_c)
    q_pt = tl.trans(q_p)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc_t = tl.zeros([R, BLOCK_H], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        row = _rows(pages, n0, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        valid, c, pe = _tile(CACHE, row, n0, end, R, P, BLOCK_N)
        s = tl.dot(c, q_ct, input_precision=PRECISION)
        s += tl.dot(pe, q_pt, input_precision=PRECISION)
        s = tl.where(valid[:, None], s * qk_scale, float("-inf"))              # [BLOCK_N, BLOCK_H], base 2
        m_new = tl.maximum(m, tl.max(s, 0))
        alpha = tl.exp2(m - m_new)
        prob = tl.exp2(s - m_new[None, :])
        total = total * alpha + tl.sum(prob, 0)
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(c), prob.to(c.dtype), input_precision=PRECISION)
        m = m_new
    return m, total, tl.trans(acc_t)


@triton.jit
def _attend_split_r(QC, q_p, b64, h, live, stride_qcb, stride_qch, CACHE, pages, start, end, stride_page, qk_scale,
                    PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, R_CHUNKS: tl.constexpr,
                    PAGE_ROWS: tl.constexpr, PREFETCH: tl.constexpr):
    """Heads-major with the latent axis as R_CHUNKS chunks of RC: query `[C, H, RC]`, tiles `[C, N, RC]`,
    accumulator `[C, H, RC]`, returned as `[H, R]` (r = chunk * RC + j)."""
    RC: tl.constexpr = R // R_CHUNKS
    chunk = (tl.arange(0, R_CHUNKS) * RC)[:, None, None] + tl.arange(0, RC)[None, None, :]     # [C, 1, RC]
    q3 = tl.load(QC + b64 * stride_qcb + h[None, :, None] * stride_qch + chunk, mask=live[None, :, None], other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([R_CHUNKS, BLOCK_H, RC], tl.float32)
    if PREFETCH:
        row = _rows(pages, start, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        ahead = _rows(pages, start + BLOCK_N, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
    for n0 in range(start, end, BLOCK_N):
        if PREFETCH:
            cur = row
            row = ahead
            ahead = _rows(pages, n0 + 2 * BLOCK_N, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        else:
            cur = _rows(pages, n0, end, stride_page, PAGE_SIZE, R, P, BLOCK_N, PAGE_ROWS)
        valid = n0 + tl.arange(0, BLOCK_N) < end
        c = tl.load(CACHE + cur[None, :, None] + chunk, mask=valid[None, :, None], other=0.0)     # [C, N, RC]
        pe = tl.load(CACHE + cur[:, None] + R + tl.arange(0, P)[None, :], mask=valid[:, None], other=0.0)
        s = tl.sum(tl.dot(q3, tl.permute(c, (0, 2, 1)), input_precision=PRECISION), 0)      # [H, N]
        s += tl.dot(q_p, tl.trans(pe), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        prob = tl.exp2(s - m_new[:, None])
        total = total * alpha + tl.sum(prob, 1)
        prob3 = tl.broadcast_to(prob.to(c.dtype)[None, :, :], [R_CHUNKS, BLOCK_H, BLOCK_N])
        acc = acc * alpha[None, :, None] + tl.dot(prob3, c, input_precision=PRECISION)
        m = m_new
    return m, total, tl.reshape(tl.permute(acc, (1, 0, 2)), [BLOCK_H, R])
