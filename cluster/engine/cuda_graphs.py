"""Decode steps replayed as CUDA graphs, one capture per batch bucket, all captured at startup.

A graph replays a whole decode step in one launch: future-token resolution, the model with the
Triton paged-attention kernels inside (their grid depends on the batch only, so one graph
serves every context length), the lm_head, the greedy argmax and the store of that argmax into
the future map. Plain greedy batches then need nothing outside the graph but the copy of the
sampled ids to the host; other sampling reads the graph's final hidden states.

Inputs land in one static int64 buffer through one host-to-device copy per step (layout in
`_Layout`). Requests beyond the real batch write into one scratch page and attend to it alone;
their argmax goes to a trash slot of the future map, so padding never touches live state.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cluster.engine.attention_context import AttentionContext, flat_pages
from cluster.engine.forward_batch import ForwardInput

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
ENV_SWITCH = "PDCLUSTER_CUDA_GRAPHS"                             # 0 = eager decode on CUDA


def cuda_graphs_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get(ENV_SWITCH, "1") != "0"


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    return tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)


@dataclass(frozen=True)
class _Layout:
    """Offsets into the static input buffer: five `[max_batch]` rows (input ids, positions, KV slots,
    page starts, future slots), then the flat page list."""
    max_batch: int
    max_pages: int

    def row(self, k: int, b: int) -> slice:
        return slice(k * self.max_batch, k * self.max_batch + b)

    @property
    def pages(self) -> slice:
        return slice(5 * self.max_batch, 5 * self.max_batch + self.max_pages)

    @property
    def size(self) -> int:
        return 5 * self.max_batch + self.max_pages


@contextlib.contextmanager
def _no_gc():
    """No garbage collection while capturing: a collected CUDA graph (another runner's, in a cycle) is
    destroyed by a call that a capture forbids, and the capture fails."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor         # [b, hidden] final (normed) hidden states, written by every replay
    greedy_ids: torch.Tensor     # [b] argmax of the logits, also stored into the future map


class DecodeGraphs:
    def __init__(self, model, kv_caches, future_map: torch.Tensor, trash_slot: int, page_allocator,
                 page_size: int, max_batch: int, device):
        self.model, self.kv_caches, self.future_map = model, kv_caches, future_map
        self.page_size, self.device, self.trash_slot = page_size, device, trash_slot
        self.buckets = batch_buckets(max_batch)
        self.scratch_page = page_allocator.allocate(1)[0]   # padding writes land here, never read by a live row
        # prefix sharing can list a page for several requests: room for twice the pool
        self.layout = _Layout(max_batch, 2 * page_allocator.num_pages + max_batch + 1)
        self.static = torch.zeros(self.layout.size, dtype=torch.int64, device=device)
        self.host = np.zeros(self.layout.size, dtype=np.int64)
        self.pool = torch.cuda.graph_pool_handle()
        self.steps: dict[int, CapturedStep] = {}
        self.capture_s = 0.0
        self.capture_bytes = 0

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Largest batch first, so smaller graphs reuse its memory in the shared pool."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()   # the capture empties the cache itself: measure the pool alone
        reserved0 = torch.cuda.memory_reserved(self.device)
        t0 = time.perf_counter()
        with _no_gc():
            for b in sorted(self.buckets, reverse=True):
                if b not in self.steps:
                    self.steps[b] = self._capture(b)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - reserved0
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.2f s, %.0f MiB", len(self.steps),
                    self.buckets[0], self.buckets[-1], self.capture_s, self.capture_bytes / 2 ** 20)

    def run(self, fi: ForwardInput) -> Optional[CapturedStep]:
        """Replay one decode step; None when no bucket fits (run eagerly). Rows past `fi.num_reqs` are padding."""
        n = fi.num_reqs
        i = bisect.bisect_left(self.buckets, n)
        if i == len(self.buckets) or not fi.input_ids.is_cpu or not self._fill(fi, self.buckets[i]):
            return None
        step = self.steps.get(self.buckets[i])
        if step is None:
            with _no_gc():
                step = self.steps[self.buckets[i]] = self._capture(self.buckets[i])
        step.graph.replay()
        return step

    def _fill(self, fi: ForwardInput, b: int) -> bool:
        n, ps, lay, h = fi.num_reqs, self.page_size, self.layout, self.host
        pos = np.asarray(fi.prefix_lens, dtype=np.int64)
        counts = pos // ps + 1
        if fi.block_table is not None:   # the scheduler's persistent rows: one masked gather
            table = fi.block_table.numpy()
            pages = table[np.arange(table.shape[1])[None, :] < counts[:, None]]
        else:
            pages = flat_pages(fi.page_tables, counts.tolist())
        m = pages.size
        if m + 1 > lay.max_pages:
            return False
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        ids, positions, slots, page_start, future = (h[lay.row(k, b)] for k in range(5))
        ids[:n] = fi.input_ids.numpy()
        ids[n:] = 0
        positions[:n] = pos
        positions[n:] = 0
        slots[:n] = pages[starts + pos // ps] * ps + pos % ps
        slots[n:] = self.scratch_page * ps
        page_start[:n] = starts
        page_start[n:] = m                                  # padding rows: the scratch page after the live ones
        future[:n] = fi.future_slots if fi.future_slots else self.trash_slot
        future[:n][future[:n] < 0] = self.trash_slot
        future[n:] = self.trash_slot
        h[lay.pages.start:lay.pages.start + m] = pages
        h[lay.pages.start + m] = self.scratch_page
        end = lay.pages.start + m + 1
        # NOTE: pageable source: the copy is staged before it returns, so the host buffer is free again
        self.static[:end].copy_(torch.from_numpy(h[:end]), non_blocking=True)
        return True

    @torch.inference_mode()
    def _capture(self, b: int) -> CapturedStep:
        lay, static = self.layout, self.static
        ids, positions, slots, page_start, future = (static[lay.row(k, b)] for k in range(5))
        pages = static[lay.pages]

        def run() -> tuple[torch.Tensor, torch.Tensor]:
            resolved = torch.where(ids < 0, self.future_map[(-ids - 1).clamp(min=0)], ids)
            ctx = AttentionContext(b, 1, positions, slots, None, None, None, None, True, backend="triton",
                                   pages=pages, page_start=page_start, seq_lens=positions + 1)
            hidden = self.model(resolved, positions, self.kv_caches, ctx)
            greedy = self.model.compute_logits(hidden, upcast=False).argmax(dim=-1)
            self.future_map.index_copy_(0, future, greedy)
            return hidden, greedy

        # inputs of a harmless step (scratch page, trash slot) for the warm-up and the capture
        for k, value in ((0, 0), (1, 0), (2, self.scratch_page * self.page_size), (3, 0), (4, self.trash_slot)):
            static[lay.row(k, b)] = value
        static[lay.pages.start] = self.scratch_page
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):   # warm-up outside the graph (allocator, library handles, Triton compiles)
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden, greedy = run()
        return CapturedStep(graph, hidden, greedy)
