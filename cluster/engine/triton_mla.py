"""MLA decode attention in Triton (CUDA): the absorbed form reading latent pages in place.

The cache of one layer is `[num_pages, page_size, R + P]` (kv_cache.py: the latent `c`, R values,
then the rope key, P values). A decode query, already absorbed into latent space (mla.py:
`q_nope W_UK` `[B, H, R]` and `q_pe` `[B, H, P]`, unit last strides), scores every cached token with one
dot over both parts; the output is the softmax-weighted sum of the latents `c`, `[B, H, R]`
(W_UV is applied after).

The work is bound by reading the latents once, so the layout serves that read (triton_mla_attend.py
holds a program's walk over its tiles: heads-major, the latent axis split over warps, or tokens-major):
- Heads share tiles: one program takes a block of up to 64 heads (`head_block`: all of
  DeepSeek-V2-Lite's 16, half of V3's 128; 16 for float32) and each `[BLOCK_N, R + P]` tile it
  loads feeds both of its dots for all of them (the latent is key and value at once). A 64-head
  block's float32 accumulator `[64, R]` is as much as one program's registers hold, so more heads take more
  blocks; the head block is the grid's fastest axis, so the blocks that read one latent slice run
  side by side and all but the first find it in L2. The dots take heads as rows
  (`_attend_heads_major`, the default) or tokens and latent rows (`_attend_tokens_major`, the
  Hopper tensor-core instruction's 64-row shape).
- Split-K over the sequence (flash-decoding): program (head block, split, request) takes one
  contiguous, BLOCK_N-aligned slice of the request's tokens and writes its normalised partial
  output and base-2 log-sum-exp; a second kernel merges the splits of each (request, head), or
  with `fused_merge` the split of a head block that finishes last does (an arrival counter per
  block, reset by that program; `merge_at_once`: its loads all issued before any is used, the
  kernel's tail one round trip to L2 instead of two per split). The split count fills about two programs per SM in one wave
  (`DecodeConfig.splits`) and depends on the batch shape only, never on lengths, so a decode CUDA
  graph captures a fixed grid. Each request uses only the splits its length fills with whole tiles
  (`_split_range`, in both kernels): the programs of the rest return at once, and a request with
  one split (or none: graph padding, zeros) gets its output written directly, no partial, no merge.
- Partials are kept in q's dtype (float32 models stay float32; the log-sum-exp is always
  float32), so the split-K traffic is small against the latent it summarises.
- A tile's rows come from the page table: one page id per token, or per page (`page_rows`), read
  in the iteration that loads the tile or two tiles ahead (`prefetch_pages`). Or whole pages by tensor
  descriptor (`tma_pages`, triton_mla_pages.py: TMA on Hopper, straight into shared memory), the
  descriptors built here per call (host-side, kernel parameters, so a CUDA graph captures them).
How a shape runs (splits, tile, pipeline depth, warps, head block, these variants) is one
`DecodeConfig`, by default the measured table's row for the head count (triton_mla_config.py;
benchmarks/mla_decode_sweep.py measures the candidates). R and P must be powers of two >= 16 (`supports`). TRITON_INTERPRET=1 before import runs it on CPU
tensors (tests).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from cluster.engine.triton_attention import LOG2E, _num_sms, _precision
from cluster.engine.triton_mla_attend import _attend_heads_major, _attend_split_r, _attend_tokens_major
from cluster.engine.triton_mla_pages import _attend_pages_tma, _query_chunks
from cluster.engine.triton_mla_config import DecodeConfig, decode_config

MAX_BLOCK_H = 64  # heads per program: the float32 accumulator [64, 512] fills 8 warps' registers
MERGE_ROWS = 4    # heads per merge program
MAX_COUNTERS = 1 << 16   # (request, head block) pairs the fused merge can count
MERGE_AT_ONCE = 8        # most splits `merge_at_once` unrolls (more: one after another)


@triton.jit
def _split_range(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """(tokens per split, splits this request uses): whole tiles, no empty split (none at length 0)."""
    per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), 1) * BLOCK_N
    return per_split, tl.cdiv(seq_len, per_split)


@triton.jit(do_not_specialize=["num_splits"])   # one compile for every split count
def _mla_split_kernel(QC, QP, CACHE, DESC_C, DESC_P, PAGES, PAGE_START, SEQ_LENS, PART_O, PART_LSE, OUT, COUNTERS,
                      qk_scale, num_splits, num_heads, stride_qcb, stride_qch, stride_qpb, stride_qph, stride_page,
                      PAGE_SIZE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TOKENS_MAJOR: tl.constexpr,
                      RELOAD_Q: tl.constexpr, FUSED_MERGE: tl.constexpr, PAGE_ROWS: tl.constexpr,
                      PREFETCH: tl.constexpr, R_CHUNKS: tl.constexpr, TMA: tl.constexpr,
                      PAIRS: tl.constexpr, MERGE_SPLITS: tl.constexpr):
    h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    per_split, used = _split_range(seq_len, num_splits, BLOCK_N)
    if split < tl.maximum(used, 1):    # split 0 always runs: an empty request (graph padding) gets zeros
        start = split * per_split
        end = tl.minimum(start + per_split, seq_len)
        live = h < num_heads
        r = tl.arange(0, R)
        b64 = b.to(tl.int64)
        q_c_ptrs = QC + b64 * stride_qcb + h[:, None] * stride_qch + r[None, :]
        q_c = tl.load(q_c_ptrs, mask=live[:, None], other=0.0)
        q_p = tl.load(QP + b64 * stride_qpb + h[:, None] * stride_qph + tl.arange(0, P)[None, :],
                      mask=live[:, None], other=0.0)
        pages = PAGES + tl.load(PAGE_START + b)
        if TMA:
            q = q_c if R_CHUNKS == 1 else _query_chunks(QC, b64, h, live, stride_qcb, stride_qch, R, R_CHUNKS)
            m, total, acc = _attend_pages_tma(q, q_p, DESC_C, DESC_P, pages, start, end, qk_scale, PAGE_SIZE, R,
                                              BLOCK_H, BLOCK_N, PRECISION, PREFETCH, R_CHUNKS, PAIRS)
        elif TOKENS_MAJOR:
            m, total, acc = _attend_tokens_major(q_c, q_p, CACHE, pages, start, end, stride_page, qk_scale,
                                                 PAGE_SIZE, R, P, BLOCK_H, BLOCK_N, PRECISION, PAGE_ROWS)
        elif R_CHUNKS > 1:
            m, total, acc = _attend_split_r(QC, q_p, b64, h, live, stride_qcb, stride_qch, CACHE, pages, start, end,
                                            stride_page, qk_scale, PAGE_SIZE, R, P, BLOCK_H, BLOCK_N, PRECISION,
                                            R_CHUNKS, PAGE_ROWS, PREFETCH)
        else:
            m, total, acc = _attend_heads_major(q_c, q_p, q_c_ptrs, live, CACHE, pages, start, end, stride_page,
                                                qk_scale, PAGE_SIZE, R, P, BLOCK_H, BLOCK_N, PRECISION, RELOAD_Q,
                                                PAGE_ROWS, PREFETCH)
        out = acc / tl.maximum(total, 1e-30)[:, None]     # an empty request (graph padding): zeros
        rows = b64 * num_heads + h                                                    # [B, H] rows
        if used <= 1:                                     # the one split (or none) is the answer
            tl.store(OUT + rows[:, None] * R + r[None, :], out.to(OUT.dtype.element_ty), mask=live[:, None])
        else:
            part = rows * num_splits + split                                          # [B, H, S] rows
            tl.store(PART_O + part[:, None] * R + r[None, :], out.to(PART_O.dtype.element_ty), mask=live[:, None])
            tl.store(PART_LSE + part, m + tl.log2(total), mask=live)    # a used split has tokens: total > 0
            if FUSED_MERGE:
                tl.debug_barrier()                        # NOTE: all of this block's partial stored first
                counter = COUNTERS + b64 * tl.num_programs(0) + tl.program_id(0)
                if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:   # the last split to finish merges
                    if MERGE_SPLITS:
                        _merge_rows_at_once(PART_O, PART_LSE, OUT, rows, live, num_splits, used, R, BLOCK_H,
                                            MERGE_SPLITS)
                    else:
                        _merge_rows(PART_O, PART_LSE, OUT, rows, live, num_splits, used, R, BLOCK_H, ".cg")
                    tl.store(counter, 0)                  # ready for the next launch (graph replays too)


@triton.jit
def _merge_rows(PART_O, PART_LSE, OUT, rows, live, num_splits, used, R: tl.constexpr, ROWS: tl.constexpr,
                CACHE: tl.constexpr):
    """OUT's `rows` (b * H + h, one request): their `used` split partials weighted by log-sum-exp.
    `CACHE` ".cg": partials other programs just wrote are read past L1."""
    r = tl.arange(0, R)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    for i in range(used):
        top = tl.maximum(top, tl.load(PART_LSE + rows * num_splits + i, mask=live, other=0.0, cache_modifier=CACHE))
    acc = tl.zeros([ROWS, R], tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    for i in range(used):
        w = tl.exp2(tl.load(PART_LSE + rows * num_splits + i, mask=live, other=0.0, cache_modifier=CACHE) - top)
        acc += w[:, None] * tl.load(PART_O + (rows * num_splits + i)[:, None] * R + r[None, :], mask=live[:, None],
                                    other=0.0, cache_modifier=CACHE).to(tl.float32)
        total += w
    tl.store(OUT + rows[:, None] * R + r[None, :], (acc / total[:, None]).to(OUT.dtype.element_ty), mask=live[:, None])


@triton.jit
def _merge_rows_at_once(PART_O, PART_LSE, OUT, rows, live, num_splits, used, R: tl.constexpr, ROWS: tl.constexpr,
                        SPLITS: tl.constexpr):
    """`_merge_rows` (read past L1) over SPLITS >= used splits unrolled, those past `used` masked off: no
    load waits on another, so the merge, the kernel's tail, takes about one round trip to L2 instead of
    two per split."""
    r = tl.arange(0, R)
    top = tl.full([ROWS], float("-inf"), tl.float32)
    for i in tl.static_range(SPLITS):
        lse = tl.load(PART_LSE + rows * num_splits + i, mask=live & (i < used), other=0.0, cache_modifier=".cg")
        top = tl.maximum(top, tl.where(i < used, lse, float("-inf")))
    acc = tl.zeros([ROWS, R], tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    for i in tl.static_range(SPLITS):
        use = live & (i < used)
        lse = tl.load(PART_LSE + rows * num_splits + i, mask=use, other=0.0, cache_modifier=".cg")
        w = tl.where(i < used, tl.exp2(lse - top), 0.0)
        acc += w[:, None] * tl.load(PART_O + (rows * num_splits + i)[:, None] * R + r[None, :], mask=use[:, None],
                                    other=0.0, cache_modifier=".cg").to(tl.float32)
        total += w
    tl.store(OUT + rows[:, None] * R + r[None, :], (acc / total[:, None]).to(OUT.dtype.element_ty), mask=live[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _mla_merge_kernel(PART_O, PART_LSE, SEQ_LENS, OUT, num_splits, num_heads, R: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    b = tl.program_id(1).to(tl.int64)
    _, used = _split_range(tl.load(SEQ_LENS + b), num_splits, BLOCK_N)
    if used > 1:                                          # one split or none: the split kernel wrote it
        _merge_rows(PART_O, PART_LSE, OUT, b * num_heads + h, h < num_heads, num_splits, used, R, ROWS, "")


def supports(kv_lora_rank: int, rope_dim: int) -> bool:
    return all(n >= 16 and n & (n - 1) == 0 for n in (kv_lora_rank, rope_dim))


def head_block(num_heads: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Heads per program: all of them up to MAX_BLOCK_H (16 at least: tl.dot's smallest M); float32
    tiles and queries are twice as large, so float32 models keep blocks of 16."""
    cap = 16 if dtype == torch.float32 else MAX_BLOCK_H
    return min(cap, max(16, triton.next_power_of_2(num_heads)))


def decode_latent(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, pages: torch.Tensor,
                  page_start: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  config: DecodeConfig | None = None, **overrides) -> torch.Tensor:
    """q_latent `[B, H, R]` and q_pe `[B, H, P]` (absorbed; unit last stride), cache
    `[num_pages, page_size, R + P]`, request b's pages `pages[page_start[b]:]` covering `seq_lens[b]`
    tokens (int64, the Triton attention context's layout) -> softmax-weighted latents `[B, H, R]`
    (contiguous) in q's dtype. `config`: how to run it (default: the table's row for the head count,
    triton_mla_config.py); `overrides`: DecodeConfig fields replaced in it (tests, the sweep)."""
    b, h, r = q_latent.shape
    p = q_pe.shape[-1]
    cfg = config or decode_config(h, q_latent.dtype)
    cfg = dataclasses.replace(cfg, **overrides) if overrides else cfg
    q_latent = q_latent if q_latent.stride(-1) == 1 else q_latent.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    block_h = cfg.block_h or head_block(h, q_latent.dtype)
    head_blocks = triton.cdiv(h, block_h)
    splits = cfg.splits(b, head_blocks, _num_sms(q_latent.device))
    out = torch.empty(b, h, r, dtype=q_latent.dtype, device=q_latent.device)
    # one split (a large batch): the split kernel writes the answer itself, no partials, no merge
    part_o = out if splits == 1 else torch.empty(b, h, splits, r, device=q_latent.device,
                                                 dtype=torch.float32 if cfg.float32_partials else q_latent.dtype)
    part_lse = torch.empty(b, h, splits, dtype=torch.float32, device=q_latent.device)
    fused_merge = cfg.fused_merge and splits > 1 and b * head_blocks <= MAX_COUNTERS
    counters = _merge_counters(q_latent.device) if fused_merge else part_lse
    page_size = cache.shape[1]
    desc_c, desc_p = _page_descriptors(cache, r, p, cfg.block_n, cfg.r_chunks) if cfg.tma_pages else (None, None)
    _mla_split_kernel[(head_blocks, splits, b)](
        q_latent, q_pe, cache, desc_c, desc_p, pages, page_start, seq_lens, part_o, part_lse, out, counters,
        scale * LOG2E, splits, h, q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), cache.stride(0),
        PAGE_SIZE=page_size, R=r, P=p, BLOCK_H=block_h, BLOCK_N=cfg.block_n,
        PRECISION=_precision(q_latent.dtype), TOKENS_MAJOR=cfg.tokens_major, RELOAD_Q=cfg.reload_q,
        FUSED_MERGE=fused_merge, PAGE_ROWS=cfg.page_rows and cfg.block_n % page_size == 0,
        PREFETCH=cfg.prefetch_pages, R_CHUNKS=cfg.r_chunks, TMA=desc_c is not None, PAIRS=cfg.page_pairs,
        MERGE_SPLITS=triton.next_power_of_2(splits) if fused_merge and cfg.merge_at_once and splits <= MERGE_AT_ONCE
        else 0,
        num_warps=cfg.warps(block_h), num_stages=cfg.num_stages, maxnreg=cfg.max_registers or None)
    if splits > 1 and not fused_merge:
        _mla_merge_kernel[(triton.cdiv(h, MERGE_ROWS), b)](part_o, part_lse, seq_lens, out, splits, h, R=r,
                                                            ROWS=MERGE_ROWS, BLOCK_N=cfg.block_n, num_warps=4)
    return out


def _page_descriptors(cache: torch.Tensor, r: int, p: int, block_n: int, r_chunks: int = 1):
    """`tma_pages`' tensor descriptors over the cache as rows `[pages * page_size, R + P]`: blocks of a
    page's latents (`[page_size, R]`, or `[page_size, r_chunks, R // r_chunks]`) and of its rope keys;
    (None, None) (the pointer walks) where the pages are not rows of one matrix, a tile is not whole
    pages, or a page is shorter than a dot's 16 rows."""
    num_pages, page_size, width = cache.shape
    if page_size < 16 or block_n % page_size or cache.stride(1) != width or cache.stride(0) != page_size * width:
        return None, None
    from triton.tools.tensor_descriptor import TensorDescriptor
    rows = cache.as_strided((num_pages * page_size, width), (width, 1))
    desc_p = TensorDescriptor(rows, list(rows.shape), [width, 1], [page_size, p])
    if r_chunks == 1:
        return TensorDescriptor(rows, list(rows.shape), [width, 1], [page_size, r]), desc_p
    rc = r // r_chunks
    return TensorDescriptor(rows, [rows.shape[0], r_chunks, rc], [width, rc, 1], [page_size, r_chunks, rc]), desc_p


_counters: dict = {}


def _merge_counters(device: torch.device) -> torch.Tensor:
    """Per (request, head block) arrivals of the fused merge, zero between launches (the merging
    program resets its own), allocated once per device (before any graph capture uses it)."""
    if device not in _counters:
        _counters[device] = torch.zeros(MAX_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]
