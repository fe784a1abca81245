"""How the MLA decode kernel (triton_mla.py) runs a batch shape: its tuning knobs as one frozen value,
and a small table of the best measured per head count.

The kernel is bound by reading the latents once, so a configuration is judged by its time against
that read (benchmarks/mla_decode_sweep.py checks every candidate's latents against a float32 softmax,
times it on the GPU and prints the winner as a `TABLE` row to paste here). The split count
depends on the batch shape only (never on lengths), so a decode CUDA graph captures a fixed grid.
"""
from __future__ import annotations

import dataclasses

import torch

MAX_SPLITS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeConfig:
    """num_splits: sequence splits per (request, head block), 0 = sized to the SMs (`splits`);
    programs_per_sm: the grid that sizing aims at, in programs per SM for one wave;
    block_n: tokens per tile; num_stages: Triton's pipeline depth; block_h: heads per program
    (0: `head_block`); num_warps (0: 4 for 16-head blocks, else 8);
    fused_merge: the last split of a head block merges (no second kernel);
    reload_q: the query read again for every tile instead of held in registers;
    tokens_major: tokens as the dots' rows (block_n <= 32: 64 was wrong on an H100);
    page_rows: a tile's rows from one page id per page (block_n a multiple of the page size)
    instead of one per token; prefetch_pages: the page ids of a tile read two tiles ahead, so
    the latent load never waits on them (with tma_pages: 128 page ids at once, into registers);
    float32_partials: split-K partials kept in float32;
    r_chunks: the latent axis cut into this many chunks, one per warp when it equals num_warps (3-D
    dots put the warps on the chunk axis: a warp holds a chunk of the query and the accumulator,
    not all of it), 1 = plain 2-D dots; tma_pages: whole pages read through tensor descriptors (TMA
    on Hopper), a tile being block_n // page_size pages (pages of 16 tokens or more; else the pointer
    walk); max_registers: the compiler's cap on registers per thread (ptx .maxnreg; 0: its own choice),
    to fit more programs per SM (65,536 registers: 4 warps at <= 168 fit three, 8 warps at <= 128 two);
    page_pairs: with tma_pages, a tile's pages two at a time through one online-softmax step (tiles of
    an even number of pages; else page by page); merge_at_once: the fused merge (the kernel's tail) with
    its loop over splits unrolled to a power of two, so every split's loads are issued before any is used."""
    num_splits: int = 0
    programs_per_sm: float = 2
    block_n: int = 32
    num_stages: int = 2
    block_h: int = 0
    num_warps: int = 0
    fused_merge: bool = False
    reload_q: bool = False
    tokens_major: bool = False
    page_rows: bool = False
    prefetch_pages: bool = False
    float32_partials: bool = False
    r_chunks: int = 1
    tma_pages: bool = False
    max_registers: int = 0
    page_pairs: bool = False
    merge_at_once: bool = False

    def __post_init__(self):
        assert 0 <= self.num_splits <= MAX_SPLITS and self.programs_per_sm > 0, self
        assert self.block_n >= 16 and self.block_n & (self.block_n - 1) == 0, self
        assert self.block_h in (0, 16, 32, 64) and self.num_warps in (0, 1, 2, 4, 8, 16), self
        assert self.num_stages >= 1 and self.r_chunks in (1, 2, 4, 8), self
        assert self.max_registers == 0 or 24 <= self.max_registers <= 255, self
        assert not (self.r_chunks > 1 and (self.tokens_major or self.reload_q)), self
        assert not (self.tma_pages and (self.tokens_major or self.reload_q)), self
        assert self.tma_pages or not self.page_pairs, self
        assert self.fused_merge or not self.merge_at_once, self
        if self.tokens_major and self.block_n > 32:
            # measured wrong on an H100 in bfloat16 (64-token tiles, 16 heads) and never faster than
            # the default orientation; refused until someone finds why
            raise ValueError(f"tokens_major supports block_n <= 32, got {self.block_n}")

    def splits(self, batch: int, head_blocks: int, num_sms: int) -> int:
        """The split count: as set, or about `programs_per_sm` programs per SM in one wave."""
        if self.num_splits:
            return self.num_splits
        return max(1, min(MAX_SPLITS, int(self.programs_per_sm * num_sms) // max(1, batch * head_blocks)))

    def warps(self, block_h: int) -> int:
        return self.num_warps or (4 if block_h <= 16 else 8)

    def changes(self) -> list[str]:
        """`name=value` for the fields that differ from the defaults."""
        base = DecodeConfig()
        return [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)]

    def brief(self) -> str:
        """The changes comma-separated, or "default" (the sweep's keys)."""
        return ",".join(self.changes()) or "default"

    def code(self) -> str:
        """This config as Python (a TABLE row)."""
        return f"DecodeConfig({', '.join(self.changes())})"


# Per head count (the smallest bound at or above the model's), bfloat16 / float16, on an H100, batch
# 64 x 2,048 tokens (benchmarks/mla_decode_sweep.py). 16 heads: whole pages through TMA, 16-token tiles,
# 7 stages (22:00 UTC sweep of 2026-12-07: 0.0672 ms = 1.35x one latent read, against 0.0724 for the
# pointer walk; pages shorter than 16 tokens or not contiguous take that pointer walk). The 23:39 UTC
# sweep measured two-page tiles faster (`PAGE_PAIRS_16`: 0.0662 ms = 1.33x); it becomes this row once
# test_moe_cuda.py's page-pair cases have passed on a GPU (they passed the interpreter and the sweep's
# float32 check at 2,048 tokens only). 32 / 64 / 128 heads: the 17:29 UTC sweep's winners,
# 0.1151 / 0.1328 / 0.2300 ms against 0.1438 / 0.1410 / 0.2500 for the defaults (0.1127 / 0.1321 /
# 0.2308 at 23:39).
PAGE_PAIRS_16 = DecodeConfig(num_stages=5, fused_merge=True, tma_pages=True, page_pairs=True, merge_at_once=True)
TABLE: dict[int, DecodeConfig] = {
    16: DecodeConfig(block_n=16, num_stages=7, fused_merge=True, tma_pages=True),
    32: DecodeConfig(block_h=16, num_warps=4, fused_merge=True),
    64: DecodeConfig(programs_per_sm=1, block_h=64, num_warps=8, fused_merge=True),
    128: DecodeConfig(programs_per_sm=1, block_h=64, num_warps=8, fused_merge=True),
}


def decode_config(num_heads: int, dtype: torch.dtype) -> DecodeConfig:
    """The table's row for this head count; float32 models (tests, the CPU interpreter) keep the
    defaults, whose 16-head blocks fit the float32 tiles."""
    if dtype == torch.float32:
        return DecodeConfig()
    return TABLE[min((h for h in TABLE if h >= num_heads), default=max(TABLE))]
