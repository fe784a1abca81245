"""The MLA decode split kernel's walk over whole pages read through tensor descriptors (`tma_pages`;
triton_mla.py calls it): TMA on Hopper, one bulk copy per page part straight into shared memory, no
per-token addresses, nothing staged in registers.

The descriptors view the cache as rows `[pages * page_size, R + P]`: DESC_C's block is a page's latents
`[PAGE_SIZE, R]` (or `[PAGE_SIZE, R_CHUNKS, R // R_CHUNKS]`: the latent axis in chunks), DESC_P's its rope
keys `[PAGE_SIZE, P]`. A tile is BLOCK_N // PAGE_SIZE pages, each its own online-softmax step, so the
pipeliner keeps every page of the next tiles in flight. A page id loaded in the loop takes half of the
pipeline's stages (a load feeding a load); `PREFETCH` instead reads ID_CHUNK ids at once into registers
and picks each out with a masked sum, so the descriptor loads get every stage. A request's last partial
tile goes page by page with its rows past the length zeroed: no stale value there (NaN in a fresh pool)
reaches a dot.

`PAIRS`: a whole tile's pages go two at a time through one online-softmax step (`_pair_step`): both
pages' score dots are independent (their chains of tensor-core steps interleave), and the row max, the
row sum and the accumulator's rescale, each a round trip between warps or a pass over the accumulator,
come once per 32 tokens instead of once per page.

With R_CHUNKS > 1 the query `[C, H, RC]`, each page `[C, N, RC]` and the accumulator `[C, H, RC]` carry
the chunk as a batch axis of 3-D dots, one chunk per warp when R_CHUNKS equals num_warps: a warp keeps its
query chunk in registers and reads only its chunk of each page from shared memory, where heads-major
2-D dots make every warp read the whole query again for every page.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _query_chunks(QC, b64, h, live, stride_qcb, stride_qch, R: tl.constexpr, R_CHUNKS: tl.constexpr):
    """The absorbed query of heads `h` as `[R_CHUNKS, H, R // R_CHUNKS]` (r = chunk * RC + j)."""
    RC: tl.constexpr = R // R_CHUNKS
    chunk = (tl.arange(0, R_CHUNKS) * RC)[:, None, None] + tl.arange(0, RC)[None, None, :]
    return tl.load(QC + b64 * stride_qcb + h[None, :, None] * stride_qch + chunk, mask=live[None, :, None], other=0.0)


@triton.jit
def _page_step(q, q_p, DESC_C, DESC_P, row, t0, end, m, total, acc, qk_scale, PAGE_SIZE: tl.constexpr,
               R: tl.constexpr, R_CHUNKS: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One page at cache row `row` (its tokens from t0; MASKED: those at `end` or past zeroed): scores
    from both descriptors' blocks, one online-softmax step."""
    valid = t0 + tl.arange(0, PAGE_SIZE) < end
    if R_CHUNKS > 1:
        c = DESC_C.load([row, 0, 0])                                                  # [N, C, RC]
        if MASKED:
            c = tl.where(valid[:, None, None], c, 0.0)
        s = tl.sum(tl.dot(q, tl.permute(c, (1, 2, 0)), input_precision=PRECISION), 0)   # [H, N]
    else:
        c = DESC_C.load([row, 0])                                                     # [N, R]
        if MASKED:
            c = tl.where(valid[:, None], c, 0.0)
        s = tl.dot(q, tl.trans(c), input_precision=PRECISION)
    s += tl.dot(q_p, tl.trans(DESC_P.load([row, R])), input_precision=PRECISION)
    s = s * qk_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    prob = tl.exp2(s - m_new[:, None])
    total = total * alpha + tl.sum(prob, 1)
    if R_CHUNKS > 1:
        prob3 = tl.broadcast_to(prob.to(c.dtype)[None, :, :], [R_CHUNKS, prob.shape[0], PAGE_SIZE])
        acc = acc * alpha[None, :, None] + tl.dot(prob3, tl.permute(c, (1, 0, 2)), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(prob.to(c.dtype), c, input_precision=PRECISION)
    return m_new, total, acc


@triton.jit
def _page_scores(q, q_p, DESC_C, DESC_P, row, qk_scale, R: tl.constexpr, R_CHUNKS: tl.constexpr,
                 PRECISION: tl.constexpr):
    """(latents of the whole page at cache row `row`, its scores `[H, PAGE_SIZE]` in base 2)."""
    if R_CHUNKS > 1:
        c = DESC_C.load([row, 0, 0])                                                  # [N, C, RC]
        s = tl.sum(tl.dot(q, tl.permute(c, (1, 2, 0)), input_precision=PRECISION), 0)   # [H, N]
    else:
        c = DESC_C.load([row, 0])                                                     # [N, R]
        s = tl.dot(q, tl.trans(c), input_precision=PRECISION)
    s += tl.dot(q_p, tl.trans(DESC_P.load([row, R])), input_precision=PRECISION)
    return c, s * qk_scale


@triton.jit
def _weighted(prob, c, acc, R_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + prob @ c: prob `[H, N]`, c a page's latents as loaded (`[N, R]` or `[N, C, RC]`)."""
    if R_CHUNKS > 1:
        prob3 = tl.broadcast_to(prob.to(c.dtype)[None, :, :], [R_CHUNKS, prob.shape[0], prob.shape[1]])
        acc = tl.dot(prob3, tl.permute(c, (1, 0, 2)), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(prob.to(c.dtype), c, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pair_step(q, q_p, DESC_C, DESC_P, row0, row1, m, total, acc, qk_scale, R: tl.constexpr,
               R_CHUNKS: tl.constexpr, PRECISION: tl.constexpr):
    """Two whole pages (cache rows `row0`, `row1`) as one online-softmax step."""
    c0, s0 = _page_scores(q, q_p, DESC_C, DESC_P, row0, qk_scale, R, R_CHUNKS, PRECISION)
    c1, s1 = _page_scores(q, q_p, DESC_C, DESC_P, row1, qk_scale, R, R_CHUNKS, PRECISION)
    m_new = tl.maximum(m, tl.max(tl.maximum(s0, s1), 1))
    alpha = tl.exp2(m - m_new)
    p0 = tl.exp2(s0 - m_new[:, None])
    p1 = tl.exp2(s1 - m_new[:, None])
    total = total * alpha + tl.sum(p0 + p1, 1)
    if R_CHUNKS > 1:
        acc = acc * alpha[None, :, None]
    else:
        acc = acc * alpha[:, None]
    acc = _weighted(p1, c1, _weighted(p0, c0, acc, R_CHUNKS, PRECISION), R_CHUNKS, PRECISION)
    return m_new, total, acc


@triton.jit
def _attend_pages_tma(q, q_p, DESC_C, DESC_P, pages, start, end, qk_scale, PAGE_SIZE: tl.constexpr,
                      R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                      PREFETCH: tl.constexpr, R_CHUNKS: tl.constexpr, PAIRS: tl.constexpr):
    """Online softmax over [start, end) page by page (or pair by pair, `PAIRS`) -> (max, sum, accumulator
    `[H, R]`), base 2. `q`: `[H, R]`, or `_query_chunks`' `[C, H, RC]` with R_CHUNKS > 1."""
    PAGES: tl.constexpr = BLOCK_N // PAGE_SIZE
    ID_CHUNK: tl.constexpr = 128
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    if R_CHUNKS > 1:
        acc = tl.zeros([R_CHUNKS, BLOCK_H, R // R_CHUNKS], tl.float32)
    else:
        acc = tl.zeros([BLOCK_H, R], tl.float32)
    whole = start + (end - start) // BLOCK_N * BLOCK_N
    STEP: tl.constexpr = 2 if PAIRS and PAGES % 2 == 0 else 1      # pages per online-softmax step
    if PREFETCH:
        k = tl.arange(0, ID_CHUNK)
        for c0 in range(start, whole, ID_CHUNK * PAGE_SIZE):
            c_end = tl.minimum(c0 + ID_CHUNK * PAGE_SIZE, whole)
            ids = tl.load(pages + c0 // PAGE_SIZE + k, mask=c0 + k * PAGE_SIZE < c_end, other=0).to(tl.int32)
            for n0 in range(c0, c_end, BLOCK_N):
                for j in tl.static_range(0, PAGES, STEP):
                    row = tl.sum(tl.where(k == (n0 - c0) // PAGE_SIZE + j, ids, 0)) * PAGE_SIZE
                    if STEP == 2:
                        row1 = tl.sum(tl.where(k == (n0 - c0) // PAGE_SIZE + j + 1, ids, 0)) * PAGE_SIZE
                        m, total, acc = _pair_step(q, q_p, DESC_C, DESC_P, row, row1, m, total, acc, qk_scale, R,
                                                   R_CHUNKS, PRECISION)
                    else:
                        m, total, acc = _page_step(q, q_p, DESC_C, DESC_P, row, n0 + j * PAGE_SIZE, end, m, total,
                                                   acc, qk_scale, PAGE_SIZE, R, R_CHUNKS, False, PRECISION)
    else:
        for n0 in range(start, whole, BLOCK_N):
            for j in tl.static_range(0, PAGES, STEP):
                row = tl.load(pages + n0 // PAGE_SIZE + j).to(tl.int32) * PAGE_SIZE
                if STEP == 2:
                    row1 = tl.load(pages + n0 // PAGE_SIZE + j + 1).to(tl.int32) * PAGE_SIZE
                    m, total, acc = _pair_step(q, q_p, DESC_C, DESC_P, row, row1, m, total, acc, qk_scale, R,
                                               R_CHUNKS, PRECISION)
                else:
                    m, total, acc = _page_step(q, q_p, DESC_C, DESC_P, row, n0 + j * PAGE_SIZE, end, m, total, acc,
                                               qk_scale, PAGE_SIZE, R, R_CHUNKS, False, PRECISION)
    for t0 in range(whole, end, PAGE_SIZE):     # the last partial tile
        row = tl.load(pages + t0 // PAGE_SIZE).to(tl.int32) * PAGE_SIZE
        m, total, acc = _page_step(q, q_p, DESC_C, DESC_P, row, t0, end, m, total, acc, qk_scale,
                                   PAGE_SIZE, R, R_CHUNKS, True, PRECISION)
    if R_CHUNKS > 1:
        acc = tl.reshape(tl.permute(acc, (1, 0, 2)), [BLOCK_H, R])
    return m, total, acc
