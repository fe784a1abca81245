"""HostTier: the prefix cache's second tier, KV pages in host memory, and the copies between tiers.

Host pages are page-major (`[num_pages, layers, planes, kv_heads, page_size, head_dim]`, the
device pool's planes, latent layout included), so a run of consecutive host pages is one
contiguous block: one DMA per run. On CUDA the memory is pinned.

Write-back (`write`, on eviction from the device) runs at once: the pages are the tree's,
which no forward writes, and once read they may be reused by anyone (a decode worker's KV
import included). On CUDA a side stream gathers them into a staging block (the host waits for
that gather only) and another carries the block to host memory behind the forwards.

Loads (`load`, on a host hit) must not run before the forwards already launched have
finished: a freshly allocated page may still be written by one of them (a finished request
riding along). So they are queued, sealed with the forward iteration about to launch
(`seal`), and run on the forward thread right before that forward (`flush`, through
`wrap_forward` and `launching`): on CUDA on their own stream, the forward stream waiting for
them on the device only. A host page with a queued load is pinned: the host tier's eviction
skips it. On the CPU every copy is synchronous.

`LoadCost` decides whether a host hit is loaded or recomputed: bytes / measured copy
bandwidth against tokens / the worker's measured prefill speed.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.engine.page_allocator import PageAllocator

PREFILL_EWMA = 0.3        # weight of the newest prefill-speed sample


class LoadCost:
    """Predicted seconds to load host pages back against recomputing their tokens."""

    def __init__(self, copy_bytes_per_s: float, bytes_per_token: int):
        self.copy_bytes_per_s = copy_bytes_per_s
        self.bytes_per_token = bytes_per_token
        self.prefill_tokens_per_s: Optional[float] = None   # until the first prefill is timed

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        speed = num_tokens / seconds
        old = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = speed if old is None else old + PREFILL_EWMA * (speed - old)

    def load_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.bytes_per_token / self.copy_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s else float("inf")

    def should_load(self, num_tokens: int) -> bool:
        return self.load_seconds(num_tokens) < self.recompute_seconds(num_tokens)


def _runs(pages: list[int]) -> list[tuple[int, int, int]]:
    """(index into `pages`, first page, length) of each run of consecutive page ids."""
    out, i = [], 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[j - 1] + 1:
            j += 1
        out.append((i, pages[i], j - i))
        i = j
    return out


class HostTier:
    def __init__(self, pool: KVPool, num_pages: int):
        self.pool = pool
        self.allocator = PageAllocator(num_pages)
        self.num_pages = num_pages
        self.on_cuda = pool.device.type == "cuda"
        shape = (num_pages, pool.num_layers, pool.num_planes, pool.num_kv_heads, pool.page_size, pool.head_dim)
        self.kv = torch.zeros(shape, dtype=pool.dtype, pin_memory=self.on_cuda)
        self.page_bytes = self.kv[0].numel() * self.kv.element_size()
        if self.on_cuda:
            self.gather_stream, self.to_host_stream, self.load_stream = (
                torch.cuda.Stream(pool.device) for _ in range(3))
            self._gathered = None                  # event: the last write-back's pages are read
        self.bytes_to_host = self.bytes_to_device = 0
        self.loading: dict[int, int] = {}          # host page -> queued loads of it (not evictable)
        self._pending: list[tuple[list[int], list[int]]] = []           # (host, device) not sealed yet
        self._sealed: list[tuple[int, list[tuple[list[int], list[int]]]]] = []   # (forward_iter, loads)
        self._launching = 0                        # the forward iteration the forward thread runs next
        self._lock = threading.Lock()              # sealed on the scheduler thread, run on the forward one
        self.cost = LoadCost(self.measure_copy_bandwidth(), self.page_bytes // pool.page_size)

    @classmethod
    def sized(cls, pool: KVPool, gigabytes: float) -> "HostTier":
        page_bytes = pool.num_bytes // pool.num_pages
        num_pages = int(gigabytes * (1 << 30)) // page_bytes
        if num_pages < 1:
            raise ValueError(f"host tier of {gigabytes} GB holds no KV page of {page_bytes} bytes")
        return cls(pool, num_pages)

    @property
    def usage(self) -> float:
        return 1.0 - self.allocator.num_free_pages / self.num_pages

    # ---- device -> host, at once -------------------------------------------------
    def write(self, device_pages: list[int], host_pages: list[int]) -> None:
        """Copy device pages to host pages (eviction from the device); the device pages may
        be reused as soon as this returns."""
        if not device_pages:
            return
        kv = self.pool.kv                          # [layers, planes, heads, pages, page_size, dim]
        index = torch.tensor(device_pages, dtype=torch.int64, device=kv.device)
        if not self.on_cuda:
            block = kv.index_select(3, index).permute(3, 0, 1, 2, 4, 5)
            for i, first, n in _runs(host_pages):
                self.kv[first:first + n].copy_(block[i:i + n])
        else:
            self.gather_stream.wait_stream(torch.cuda.current_stream(kv.device))
            with torch.cuda.stream(self.gather_stream):
                block = kv.index_select(3, index).permute(3, 0, 1, 2, 4, 5).contiguous()
                self._gathered = self.gather_stream.record_event()
            self.to_host_stream.wait_event(self._gathered)
            with torch.cuda.stream(self.to_host_stream):
                block.record_stream(self.to_host_stream)
                for i, first, n in _runs(host_pages):
                    self.kv[first:first + n].copy_(block[i:i + n], non_blocking=True)
            self._gathered.synchronize()           # the device pages are free to reuse now
        self.bytes_to_host += len(device_pages) * self.page_bytes

    # ---- host -> device, before the next forward -----------------------------------
    def load(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Queue a copy of host pages into device pages (a hit on the host tier)."""
        if device_pages:
            self._pending.append((list(host_pages), list(device_pages)))
            self._pin(host_pages)
            self.bytes_to_device += len(device_pages) * self.page_bytes

    def cancel_load(self, device_pages: list[int]) -> None:
        """Drop queued (not yet sealed) loads into `device_pages`: their request was not scheduled."""
        drop = set(device_pages)
        kept = []
        for host, dev in self._pending:
            pairs = [(h, d) for h, d in zip(host, dev) if d not in drop]
            self._unpin([h for h, d in zip(host, dev) if d in drop])
            self.bytes_to_device -= (len(dev) - len(pairs)) * self.page_bytes
            if pairs:
                kept.append(([h for h, _ in pairs], [d for _, d in pairs]))
        self._pending = kept

    def seal(self, forward_iter: int) -> None:
        """The loads queued so far precede forward `forward_iter` (called before its launch)."""
        if self._pending:
            with self._lock:
                self._sealed.append((forward_iter, self._pending))
            self._pending = []

    def launching(self, forward_iter: int) -> None:
        """Forward-thread hook: `forward_iter` is the forward about to run."""
        self._launching = forward_iter

    def flush(self) -> None:
        """Run the loads sealed for forwards up to the one about to run (on the forward thread)."""
        with self._lock:
            due = [loads for it, loads in self._sealed if it <= self._launching]
            self._sealed = [(it, loads) for it, loads in self._sealed if it > self._launching]
        if not due:
            return
        forward_stream = torch.cuda.current_stream(self.pool.device) if self.on_cuda else None
        if forward_stream is not None:
            self.load_stream.wait_stream(forward_stream)
            self.load_stream.wait_stream(self.to_host_stream)   # a host page written, then loaded
        with torch.cuda.stream(self.load_stream) if forward_stream is not None \
                else contextlib.nullcontext():
            for loads in due:
                for host, dev in loads:
                    self._load_now(host, dev)
        if forward_stream is not None:
            forward_stream.wait_stream(self.load_stream)
        for loads in due:
            for host, _ in loads:
                self._unpin(host)

    def _pin(self, host_pages) -> None:
        with self._lock:
            for h in host_pages:
                self.loading[h] = self.loading.get(h, 0) + 1

    def _unpin(self, host_pages) -> None:
        with self._lock:
            for h in host_pages:
                if self.loading[h] == 1:
                    del self.loading[h]
                else:
                    self.loading[h] -= 1

    def _load_now(self, host: list[int], dev: list[int]) -> None:
        kv = self.pool.kv
        index = torch.tensor(dev, dtype=torch.int64, device=kv.device)
        parts = [self.kv[first:first + n].to(kv.device, non_blocking=self.on_cuda) for _, first, n in _runs(host)]
        block = parts[0] if len(parts) == 1 else torch.cat(parts)
        kv.index_copy_(3, index, block.permute(1, 2, 3, 0, 4, 5))

    def wrap_forward(self, forward):
        """`forward` preceded by `flush`; a prefill's time feeds the cost model (on CUDA the
        forward returns once its result is on the host, so the time is the device's)."""
        def run(fi):
            self.flush()
            if fi.is_decode:
                return forward(fi)
            t0 = time.perf_counter()
            out = forward(fi)
            self.cost.observe_prefill(sum(fi.extend_lens), time.perf_counter() - t0)
            return out
        return run

    # ---- measured once at start ----------------------------------------------------
    def measure_copy_bandwidth(self, num_pages: int = 8) -> float:
        """Bytes per second of a host-to-device copy of `num_pages` pages (the load direction)."""
        n = min(num_pages, self.num_pages)
        src = self.kv[:n]
        best = float("inf")
        for _ in range(3):
            if self.on_cuda:
                torch.cuda.synchronize(self.pool.device)
            t0 = time.perf_counter()
            dst = src.to(self.pool.device, non_blocking=self.on_cuda) if self.on_cuda else src.clone()
            if self.on_cuda:
                torch.cuda.synchronize(self.pool.device)
            best = min(best, time.perf_counter() - t0)
            del dst
        return n * self.page_bytes / max(best, 1e-9)


def attach_host_tier(executor, pool: KVPool, gigabytes: float) -> HostTier:
    """A host tier of `gigabytes` for `pool`, its loads run by `executor`'s forward thread right
    before the forward they were sealed for (the scheduler seals in `run_batch`), which also
    times prefills for its cost model."""
    tier = HostTier.sized(pool, gigabytes)
    executor.forward_fn = tier.wrap_forward(executor.forward_fn)
    first = executor.on_launch                 # layer-wise streaming's, if any: both run
    executor.on_launch = tier.launching if first is None else \
        (lambda forward_iter: (first(forward_iter), tier.launching(forward_iter)))
    return tier
