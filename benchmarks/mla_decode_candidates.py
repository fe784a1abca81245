"""The MLA decode sweep's candidate configurations (mla_decode_sweep.py): per head count, the full list
and quick mode's few best guesses (rehearsals, short GPU calls)."""
from __future__ import annotations

import dataclasses

import torch

from cluster.engine import triton_mla_config
from cluster.engine.triton_mla_config import DecodeConfig

C = DecodeConfig
# 16 heads (one head block): the split count (as programs per SM: 1 / 1.5 / 2 / 2.5 / 3 / 4 give 2 / 3 / 4 / 5 / 6
# / 8 splits at batch 64 on 132 SMs; 1 is one wave for the deep pipelines that fit one program per SM) across
# tile, pipeline depth, warps and page-read variants; quick mode takes the first three
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
# The first six are quick mode's guesses.
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
# that was swept before) give one tile buffer; 5 give two, 7 three (mla_compile_check.py). The first two
# are quick mode's.
DEEP_16 = (C(fused_merge=True, num_stages=5), C(fused_merge=True, block_n=16, num_stages=7),
           C(fused_merge=True, block_n=16, num_stages=9), C(fused_merge=True, num_stages=7),
           C(fused_merge=True, block_n=16, num_stages=5), C(fused_merge=True, r_chunks=4, num_warps=4, num_stages=5),
           C(fused_merge=True, r_chunks=4, num_warps=4, block_n=16, num_stages=7))
# more heads: head blocks of 16 to 64 (blocks of one latent slice side by side, sharing it in L2), warps,
# the latent axis in chunks
HEAD_BLOCKS = ((16, 4, 1), (32, 4, 1), (32, 8, 1), (64, 8, 1), (16, 4, 4), (32, 4, 4), (32, 8, 8), (64, 8, 8))
# the TMA page walk for more heads: (head block, warps, tile, stages, page ids ahead, latent chunks); the first
# three are quick mode's (32-head blocks in 8 chunks: 246 registers, no spills, 124 KB). Left out for spills:
# 32-head blocks of 2-D dots (450-800 bytes), 64-head blocks of 32-token tiles (12 KB), 64-head blocks with
# page ids ahead or in chunks (300-560 bytes).
TMA_BLOCKS = ((32, 8, 16, 5, True, 8), (64, 8, 16, 5, False, 1), (16, 4, 16, 5, True, 4), (16, 4, 16, 5, True, 1),
              (64, 8, 16, 7, False, 1), (16, 4, 32, 3, True, 1), (16, 4, 16, 7, False, 1), (64, 16, 16, 7, False, 1))
MANY_SPLITS = (1, 2, 4)


def candidates(heads: int, quick: bool = False) -> list[DecodeConfig]:
    if heads <= 16:
        variants = (VARIANTS_16[:2] + VARIANTS_16[19:21] + DEEP_16[:2] + TMA_16[:6] if quick
                    else VARIANTS_16 + DEEP_16 + TMA_16)
        return [dataclasses.replace(v, programs_per_sm=p) for v in variants for p in SPLIT_GRID[:3 if quick else None]]
    blocks, tma = (HEAD_BLOCKS[::4], TMA_BLOCKS[:3]) if quick else (HEAD_BLOCKS, TMA_BLOCKS)
    splits = MANY_SPLITS[:1 if quick else None]
    return [triton_mla_config.decode_config(heads, torch.bfloat16)] + [
        C(block_h=bh, num_warps=w, r_chunks=r, fused_merge=True, programs_per_sm=p) for bh, w, r in blocks
        if bh <= max(16, heads) for p in splits] + [
        C(**T, block_h=bh, num_warps=w, block_n=n, num_stages=st, prefetch_pages=ahead, r_chunks=r, programs_per_sm=p)
        for bh, w, n, st, ahead, r in tma if bh <= max(16, heads) for p in splits]
