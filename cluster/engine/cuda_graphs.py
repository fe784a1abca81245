"""Decode steps replayed as CUDA graphs, one capture per (batch, pages) bucket.

On a GPU a decode step is bound by kernel launches from Python (about 25 per layer), not by
memory: a graph replays the whole step in one launch. The step's inputs are copied into the
graph's static buffers; requests beyond the real batch, and pages beyond a request's own,
point at one scratch page that the mask hides, so padding never touches a live page.
The graph ends at the final hidden states: the lm_head and sampling run outside it, so a
cached graph holds `[batch, hidden]` rather than `[batch, vocab]` of output.
"""
from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from typing import Optional

import torch

from cluster.engine.attention import AttentionContext
from cluster.engine.forward_batch import ForwardInput

# Past 64 requests attention's memory traffic, not launches, sets the step time and graphs
# measured slower than eager (H100, Llama-3.2-1B, batch 256: 21-24 vs 17 ms): run eagerly.
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
PAGE_BUCKETS = tuple(range(8, 513, 8))   # pages per request; padding costs at most 7 masked pages
MAX_GRAPHS = 256                         # oldest capture dropped beyond (contexts keep growing)
ENV_SWITCH = "PDCLUSTER_CUDA_GRAPHS"                             # 0 = eager decode on CUDA


def cuda_graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV_SWITCH, "1") != "0"


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor      # [b]
    positions: torch.Tensor      # [b]
    slot_mapping: torch.Tensor   # [b]
    page_table: torch.Tensor     # [b, p]
    mask: torch.Tensor           # [b, 1, p * page_size], model dtype
    hidden: torch.Tensor         # [b, hidden] final (normed) hidden states, written by every replay


def _bucket(n: int, buckets: tuple[int, ...]) -> Optional[int]:
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


class DecodeGraphs:
    def __init__(self, model, kv_caches, page_allocator, page_size: int, dtype: torch.dtype, device):
        self.model, self.kv_caches = model, kv_caches
        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.scratch_page = page_allocator.allocate(1)[0]   # padding writes land here, never read unmasked
        self.pool = torch.cuda.graph_pool_handle()
        self.steps: dict[tuple[int, int], CapturedStep] = {}

    def hidden(self, input_ids: torch.Tensor, fi: ForwardInput) -> Optional[torch.Tensor]:
        """Final hidden states `[num_reqs, hidden]` of one decode step, or None when no bucket fits."""
        n = fi.num_reqs
        need = max(-(-(p + 1) // self.page_size) for p in fi.prefix_lens)
        b, p = _bucket(n, BATCH_BUCKETS), _bucket(need, PAGE_BUCKETS)
        if b is None or p is None:
            return None
        step = self.steps.get((b, p)) or self._capture(b, p)
        self._fill(step, input_ids, fi, b, p)
        step.graph.replay()
        return step.hidden[:n]

    def _fill(self, step: CapturedStep, input_ids: torch.Tensor, fi: ForwardInput, b: int, p: int) -> None:
        n, ps = fi.num_reqs, self.page_size
        table = torch.full((b, p), self.scratch_page, dtype=torch.int64)
        mask = torch.full((b, 1, p * ps), float("-inf"), dtype=self.dtype)
        mask[n:, 0, 0] = 0                                  # padded rows attend to one scratch slot
        positions = torch.zeros(b, dtype=torch.int64)
        slots = torch.full((b,), self.scratch_page * ps, dtype=torch.int64)
        for i, (pos, pages) in enumerate(zip(fi.prefix_lens, fi.page_tables)):
            used = pos // ps + 1
            table[i, :used] = torch.tensor(pages[:used])
            mask[i, 0, :pos + 1] = 0
            positions[i] = pos
            slots[i] = pages[pos // ps] * ps + pos % ps
        step.input_ids[:n].copy_(input_ids, non_blocking=True)
        step.input_ids[n:].zero_()
        for dst, src in ((step.positions, positions), (step.slot_mapping, slots),
                         (step.page_table, table), (step.mask, mask)):
            dst.copy_(src, non_blocking=True)

    def _capture(self, b: int, p: int) -> CapturedStep:
        dev, ps = self.device, self.page_size
        step = CapturedStep(
            graph=torch.cuda.CUDAGraph(), input_ids=torch.zeros(b, dtype=torch.int64, device=dev),
            positions=torch.zeros(b, dtype=torch.int64, device=dev),
            slot_mapping=torch.full((b,), self.scratch_page * ps, dtype=torch.int64, device=dev),
            page_table=torch.full((b, p), self.scratch_page, dtype=torch.int64, device=dev),
            mask=torch.zeros(b, 1, p * ps, dtype=self.dtype, device=dev), hidden=None)

        def run() -> torch.Tensor:
            # NOTE: a fresh context each time, so the K/V row index is built inside the graph
            ctx = AttentionContext(b, 1, step.positions, step.slot_mapping, step.page_table, step.mask,
                                   None, None, True)
            return self.model(step.input_ids, step.positions, self.kv_caches, ctx)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up outside the graph (allocator, library handles)
            run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(step.graph, pool=self.pool):
            step.hidden = run()
        if len(self.steps) >= MAX_GRAPHS:
            del self.steps[next(iter(self.steps))]
        self.steps[(b, p)] = step
        return step
