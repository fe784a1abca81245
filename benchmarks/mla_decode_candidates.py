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

# Quick mode, 16 heads (issue 21: the table's row at 1.35x of one latent read on an H100). Each entry: a
# config and its programs per SM (batch 64 on 132 SMs: 2 / 1.5 give 4 / 3 splits, 256 / 192 programs; 3 /
# 2.5 give 6 / 5). Figures from mla_compile_check.py (sm_90a): pages in flight per program, registers,
# shared memory; nothing spills in a main loop, every grid is one wave. All but the table's own row merge
# with every split's loads issued at once (merge_at_once: the kernel's tail, about one L2 round trip
# instead of two per split); the table's row with it alone measures that.
M = dict(fused_merge=True, tma_pages=True, merge_at_once=True)
R8 = dict(r_chunks=8, num_warps=8, max_registers=128)     # 8 warps capped at 128 registers: two per SM
QUICK_16 = (
    (C(**T, block_n=16, num_stages=7), (2, 1.5)),                       # the table's: 3 pages, 242 regs, 89 KB
    (C(**M, block_n=16, num_stages=7), (2, 1.5)),
    (C(**M, block_n=16, num_stages=9), (2, 1.5)),                       # 4 pages, 107 KB: still two per SM
    # two pages per online-softmax step: their score dots interleave, one max / sum / rescale per 32 tokens
    (C(**M, page_pairs=True, block_n=32, num_stages=5), (2, 1.5)),      # 2 x 2 pages, 241 regs, 91 KB
    (C(**M, page_pairs=True, prefetch_pages=True, block_n=32, num_stages=3), (2,)),   # 2 x 2 pages, 246 regs
    # the latent in 8 chunks over 8 warps (uncapped: 166 registers, one program per SM, so the sweeps at
    # two per SM ran two waves): 16 warps per SM, QK chains of 4 tensor-core steps instead of 36
    (C(**M, **R8, block_n=16, num_stages=7), (2, 1.5)),                 # 3 pages, 88 KB
    (C(**M, **R8, block_n=16, num_stages=9), (2,)),                     # 4 pages, 106 KB
    (C(**M, **R8, prefetch_pages=True, block_n=16, num_stages=4), (2,)),  # 3 pages, 80 KB
    (C(**M, **R8, page_pairs=True, block_n=32, num_stages=5), (2,)),    # 2 x 2 pages, 98 KB (12 B spilled,
                                                                        # none in the main loop)
    # the table's pipeline with the latent in 4 / 2 chunks over 4 warps: QK chains of 8 / 16 steps
    (C(**M, r_chunks=4, num_warps=4, block_n=16, num_stages=7), (2,)),  # 3 pages, 221 regs, 88 KB
    (C(**M, r_chunks=2, num_warps=4, block_n=16, num_stages=7), (2,)),  # 255 regs (44 B spilled, not in
                                                                        # the main loop)
    # three programs per SM: 4 warps capped at 168 registers, 70 KB (68 B spilled, none in the main loop)
    (C(**M, r_chunks=4, num_warps=4, max_registers=168, block_n=16, num_stages=5), (3, 2.5)))
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
        found = [c for c in QUICK_MORE if c.block_h <= max(16, heads)]
        if not quick:
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
