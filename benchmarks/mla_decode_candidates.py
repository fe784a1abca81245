"""The MLA decode sweep's candidate configurations (mla_decode_sweep.py): per head count, the full list
and quick mode's few best guesses (short GPU calls, rehearsals); full mode adds them to the
rest."""
from __future__ import annotations

import ast
import dataclasses

import torch

from cluster.engine import triton_mla_config
from cluster.engine.triton_mla_config import DecodeConfig

C = DecodeConfig
# 16 heads (one head block): the split count (as programs per SM: 1 / 1.5 / 2 / 2.5 / 3 / 4 give 2 / 3 / 4 / 5 / 6
# / 8 splits at batch 64 on 132 SMs; 1 is one wave for the deep pipelines that fit one program per SM) across
# tile, pipeline depth, warps and page-read variants
SPLIT_GRID = (1, 1.5, 2, 2.5, 3, 4)
VARIANTS_16 = (C(), C(fused_merge=True), C(fused_merge=True, page_rows=True), C(fused_merge=True, prefetch_pages=True),
               C(fused_merge=True, prefetch_pages=True, page_rows=True), C(fused_merge=True, float32_partials=True),
               C(fused_merge=True, num_stages=3), C(fused_merge=True, prefetch_pages=True, num_stages=3),
               C(fused_merge=True, block_n=16, num_stages=3), C(fused_merge=True, block_n=16, num_stages=4),
               C(fused_merge=True, block_n=16, num_stages=4, prefetch_pages=True),
               C(fused_merge=True, block_n=64, num_warps=8), C(fused_merge=True, num_warps=8),
               C(fused_merge=True, num_warps=2), C(fused_merge=True, reload_q=True), C(prefetch_pages=True),
               C(page_rows=True), C(fused_merge=True, tokens_major=True),
               # the latent axis over warps: one chunk of it per warp (3-D dots put every warp on the chunk axis)
               C(r_chunks=4, num_warps=4), C(fused_merge=True, r_chunks=4, num_warps=4),
               C(fused_merge=True, r_chunks=8, num_warps=8), C(fused_merge=True, r_chunks=2, num_warps=2),
               C(fused_merge=True, r_chunks=4, num_warps=4, prefetch_pages=True),
               C(fused_merge=True, r_chunks=4, num_warps=4, num_stages=3),
               C(fused_merge=True, r_chunks=8, num_warps=8, num_stages=3),
               C(fused_merge=True, r_chunks=8, num_warps=8, block_n=64),
               C(fused_merge=True, r_chunks=4, num_warps=4, block_n=16, num_stages=4),
               C(fused_merge=True, r_chunks=4, num_warps=4, block_n=16, num_stages=3),   # 3 programs per SM fit
               # 16 heads padded to a 64-row block: the Hopper tensor-core instruction's height (4x the dots)
               C(fused_merge=True, block_h=64, num_warps=8))
# whole pages through tensor descriptors (TMA): a tile of block_n // 16 pages, each one bulk copy into shared
# memory. Page ids loaded in the loop take half the pipeline's stages, so a tile gets (num_stages - 1) // 2
# buffers; read into registers ahead (prefetch_pages) it gets num_stages - 1 (mla_compile_check.py, sm_90a:
# 16-token tiles at 5 stages hold 4 pages in flight in 91 KB, two programs per SM, 241 registers, no spills).
T = dict(fused_merge=True, tma_pages=True)
TMA_16 = (C(**T, prefetch_pages=True, block_n=16, num_stages=5, r_chunks=4, num_warps=4),
          C(**T, prefetch_pages=True, block_n=16, num_stages=5),
          C(**T, prefetch_pages=True, block_n=32, num_stages=3),
          C(**T, block_n=16, num_stages=7),
          C(**T, block_h=64, num_warps=8, block_n=16, num_stages=5),                   # wgmma's 64 rows
          C(**T, prefetch_pages=True, block_n=16, num_stages=7),                      # one program per SM
          C(**T, prefetch_pages=True, block_n=16, num_stages=4),
          C(**T, prefetch_pages=True, block_n=16, num_stages=6),
          C(**T, prefetch_pages=True, block_n=32, num_stages=4),
          C(**T, prefetch_pages=True, block_n=64, num_stages=3),
          C(**T, prefetch_pages=True, block_n=16, num_stages=5, num_warps=8),
          C(**T, prefetch_pages=True, block_n=16, num_stages=5, float32_partials=True),
          C(tma_pages=True, prefetch_pages=True, block_n=16, num_stages=5),
          C(**T, block_n=16, num_stages=9), C(**T, block_n=32, num_stages=5), C(**T, block_n=16, num_stages=5),
          C(**T, block_h=64, num_warps=8, block_n=16, num_stages=7),
          # the latent axis in chunks, one per warp: a warp reads only its chunk of the query and of each page
          # (the 2-D dots read the whole 16 KB query again per warp per page: ~100 KB of shared memory per
          # 18 KB page, against ~50 KB in chunks); 227 / 166 registers, no spills
          C(**T, prefetch_pages=True, block_n=32, num_stages=3, r_chunks=4, num_warps=4),
          C(**T, prefetch_pages=True, block_n=16, num_stages=5, r_chunks=8, num_warps=8),
          C(**T, block_n=16, num_stages=7, r_chunks=4, num_warps=4),
          C(**T, prefetch_pages=True, block_n=16, num_stages=4, r_chunks=4, num_warps=4),
          C(**T, prefetch_pages=True, block_n=16, num_stages=7, r_chunks=4, num_warps=4))
# the pointer walk with deeper pipelines: its page-id loads also take half the stages, so 2 / 3 stages (all
# that was swept before) give one tile buffer; 5 give two, 7 three (mla_compile_check.py).
DEEP_16 = (C(fused_merge=True, num_stages=5), C(fused_merge=True, block_n=16, num_stages=7),
           C(fused_merge=True, block_n=16, num_stages=9), C(fused_merge=True, num_stages=7),
           C(fused_merge=True, block_n=16, num_stages=5), C(fused_merge=True, r_chunks=4, num_warps=4, num_stages=5),
           C(fused_merge=True, r_chunks=4, num_warps=4, block_n=16, num_stages=7))
# more heads: head blocks of 16 to 64 (blocks of one latent slice side by side, sharing it in L2), warps,
# the latent axis in chunks
HEAD_BLOCKS = ((16, 4, 1), (32, 4, 1), (32, 8, 1), (64, 8, 1), (16, 4, 4), (32, 4, 4), (32, 8, 8), (64, 8, 8))
# the TMA page walk for more heads: (head block, warps, tile, stages, page ids ahead, latent chunks)
# (32-head blocks in 8 chunks: 246 registers, no spills, 124 KB). Left out for spills:
# 32-head blocks of 2-D dots (450-800 bytes), 64-head blocks of 32-token tiles (12 KB), 64-head blocks with
# page ids ahead or in chunks (300-560 bytes).
TMA_BLOCKS = ((32, 8, 16, 5, True, 8), (64, 8, 16, 5, False, 1), (16, 4, 16, 5, True, 4), (16, 4, 16, 5, True, 1),
              (64, 8, 16, 7, False, 1), (16, 4, 32, 3, True, 1), (16, 4, 16, 7, False, 1), (64, 16, 16, 7, False, 1))
MANY_SPLITS = (1, 2, 4)

# Quick mode, 16 heads (issue 21: 1.3x of one latent read on an H100). Each entry: a config and its
# programs per SM (batch 64 on 132 SMs: 2 give 4 splits, 256 programs in one wave at two per SM; the
# 23:39 UTC sweep had 3 splits 20% slower). Centered on that sweep's winner, the table's row (page pairs,
# 32-token tiles, 5 stages: 2 x 2 pages in flight, 91 KB, 241 registers; 0.0662 ms = 1.33x). Figures from
# mla_compile_check.py (sm_90a); none spills. Screened out for spills in the main loop: three programs per
# SM (168 registers, any tile), page pairs in 8 warps at 128 registers, r_chunks=2 with pairs (255
# registers); for one program per SM (2 waves): pairs at 7 stages, in 8 warps uncapped, ids ahead at 4.
M = dict(fused_merge=True, tma_pages=True, merge_at_once=True)
P = dict(M, page_pairs=True)
R8 = dict(r_chunks=8, num_warps=8, max_registers=128)     # 8 warps capped at 128 registers: two per SM
QUICK_16 = (
    (C(**T, block_n=16, num_stages=7), (2,)),                           # the old row: 0.0672 ms
    (C(**M, block_n=16, num_stages=7), (2,)),                           # 0.0669: 3 pages, page by page
    (C(**M, num_stages=5), (2,)),                                       # the winner's pipeline, page by page
    (C(**P, num_stages=4), (2,)),                                       # 1 x 2 pages, 55 KB
    (C(**P, num_stages=6), (2,)),                                       # as 5 stages (91 KB): the noise
    (C(**P, block_n=64, num_stages=3), (2,)),                           # 1 x 4 pages, 2 pairs a tile, 91 KB
    (C(**M, block_n=64, num_stages=3), (2,)),                           # the same page by page
    # page ids read ahead into registers: every stage for the descriptors
    (C(**P, prefetch_pages=True, num_stages=3), (2,)),                  # 2 x 2 pages: 0.0669
    (C(**P, prefetch_pages=True, block_n=64, num_stages=2), (2,)),      # 1 x 4 pages, 91 KB
    (C(**M, prefetch_pages=True, block_n=16, num_stages=4), (2,)),      # 3 pages, 73 KB
    (C(**M, prefetch_pages=True, block_n=16, num_stages=3), (2,)),      # 2 pages, 55 KB
    (C(**M, block_n=16, num_stages=5), (2,)))                           # 2 pages, 71 KB
# quick mode, more heads: the table's row, then the TMA walk in head blocks of 16 (the 16-head shapes: every
# block reads the latent, all but the first from L2), 32 and 64 (their accumulators fit one program per SM)
QUICK_MORE = (C(**M, block_h=16, block_n=16, num_stages=7), C(**M, **R8, block_h=16, block_n=16, num_stages=7),
              C(**M, block_h=32, num_warps=8, r_chunks=8, block_n=16, num_stages=5, prefetch_pages=True,
                programs_per_sm=1),
              C(**T, block_h=64, num_warps=8, block_n=16, num_stages=5, programs_per_sm=1))


def candidates(heads: int, quick: bool = False) -> list[DecodeConfig]:
    """The configs to sweep at this head count, the table's row first (the baseline), no repeats."""
    table = triton_mla_config.decode_config(heads, torch.bfloat16)
    if heads <= 16:
        found = [dataclasses.replace(c, programs_per_sm=p) for c, splits in QUICK_16 for p in splits]
        if not quick:
            found += [dataclasses.replace(v, programs_per_sm=p) for v in VARIANTS_16 + DEEP_16 + TMA_16
                      for p in SPLIT_GRID]
    else:
        # quick mode: the table's row alone (a short call; the 23:39 UTC sweep's alternatives all lost)
        found = []
        if not quick:
            found += [c for c in QUICK_MORE if c.block_h <= max(16, heads)]
            found += [C(block_h=bh, num_warps=w, r_chunks=r, fused_merge=True, programs_per_sm=p)
                      for bh, w, r in HEAD_BLOCKS if bh <= max(16, heads) for p in MANY_SPLITS] + [
                C(**T, block_h=bh, num_warps=w, block_n=n, num_stages=st, prefetch_pages=ahead, r_chunks=r,
                  programs_per_sm=p)
                for bh, w, n, st, ahead, r in TMA_BLOCKS if bh <= max(16, heads) for p in MANY_SPLITS]
    return list(dict.fromkeys([table] + found))


def from_brief(brief: str) -> DecodeConfig:
    """The config a `DecodeConfig.brief()` names ("default" or `name=value,...`), values as Python literals."""
    if brief == "default":
        return C()
    fields = {f.name for f in dataclasses.fields(C)}
    pairs = [part.split("=", 1) for part in brief.split(",")]
    bad = [p[0] for p in pairs if len(p) != 2 or p[0] not in fields]
    if bad:
        raise ValueError(f"not DecodeConfig fields: {bad} in {brief!r}")
    return C(**{name: ast.literal_eval(value) for name, value in pairs})
