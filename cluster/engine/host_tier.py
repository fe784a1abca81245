"""HostTier: the prefix cache's second tier, KV pages in host memory, and the copies between tiers.

Host pages are layer-major (`[layers, num_pages, planes, kv_heads, page_size, head_dim]`, the
device pool's planes, latent layout included), so one layer of a run of consecutive host pages
is one contiguous block: one DMA per layer and run, which lets a load go layer by layer. On CUDA
the memory is pinned.

Write-back (`write`, on eviction from the device, of the pages `policy` wants: host_tier_policy.py)
is issued at once: the pages are the tree's, which no forward writes. On CUDA the host waits for
nothing: a side stream gathers them into a staging block, another carries it to host memory with
one 2-D copy per run of host pages, and what may write the device pages next waits for the
gather on the device (host_tier_copy.py; the forward stream in `flush`).

Loads (`load`, on a host hit) must not run before the forwards already launched have
finished: a freshly allocated page may still be written by one of them (a finished request
riding along). So they are queued, sealed with the forward iteration about to launch
(`seal`), and run on the forward thread right before that forward (`flush`, through
`wrap_forward` and `launching`): on CUDA on their own stream, the forward stream waiting for
them on the device only. A long load into an eager forward goes layer by layer (`flush`,
`before_layer`): on CUDA every layer is issued at once with an event each and the forward's
layer i waits for layer i's event only; on the CPU layer i is copied right before layer i.
A host page with a queued load is pinned: the host tier's eviction skips it; a device page
whose load has not run may be evicted (its request was aborted), and the tree then cancels
the load (`cancel_load`) before the page goes back to the allocator. On the CPU every copy is
synchronous.

`LoadCost` (load_cost.py) decides whether a host hit is loaded or recomputed.

Tensor parallelism: every rank has a tier of its own KV heads, as many pages as rank 0's, whose
write-backs and loads rank 0 sends it in order with the forwards (`mirror`); it runs each at once.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

import torch

from cluster.engine.host_tier_copy import by_host_page, runs_of, write_cpu, write_cuda
from cluster.engine.host_tier_policy import WritePolicy
from cluster.engine.kv_cache import KVPool
from cluster.engine.load_cost import LoadCost, copy_bandwidth
from cluster.engine.page_allocator import PageAllocator

LAYERWISE_MIN_BYTES = 16 << 20   # a load this long goes layer by layer, overlapped with the forward


class HostTier:
    def __init__(self, pool: KVPool, num_pages: int):
        self.pool = pool
        self.allocator = PageAllocator(num_pages)
        self.num_pages = num_pages
        self.on_cuda = pool.device.type == "cuda"
        shape = (pool.num_layers, num_pages, pool.num_planes, pool.num_kv_heads, pool.page_size, pool.head_dim)
        self.kv = torch.zeros(shape, dtype=pool.dtype, pin_memory=self.on_cuda)
        self.page_bytes = self.kv[:, 0].numel() * self.kv.element_size()
        if self.on_cuda:
            self.gather_stream, self.to_host_stream, self.load_stream = (
                torch.cuda.Stream(pool.device) for _ in range(3))
        self._gathered = None                      # CUDA event: the last write-back's pages are read
        self.reusers: list = []                    # CUDA streams that may write freed device pages (imports)
        self.policy = WritePolicy(num_pages)
        self.num_write_copies = 0                  # copies the write-backs issued (host-side work)
        self._timed: list = []                     # (tokens, output) of deferred prefills, timed once read
        self.bytes_to_host = self.bytes_to_device = 0
        self.mirror = None                         # rank 0 of several: mirror(op, num_pages, host, device)
        self.layerwise_min_bytes = LAYERWISE_MIN_BYTES
        self.num_layerwise_loads = 0               # forwards whose loads went layer by layer
        self.loading: dict[int, int] = {}          # host page -> queued loads of it (not evictable)
        self._pending: list[tuple[list[int], list[int]]] = []           # (host, device) not sealed yet
        self._sealed: list[tuple[int, list[tuple[list[int], list[int]]]]] = []   # (forward_iter, loads)
        self._launching = 0                        # the forward iteration the forward thread runs next
        self._by_layer: Optional[tuple[list[int], list[int]]] = None    # CPU: the running forward's loads
        self._next_layer = 0                       # CPU: the first of them not copied yet
        self._layer_events: Optional[list] = None  # CUDA: the running forward's loads, an event per layer
        self._issued = False                       # CUDA: loads issued since cancel_load last fenced them
        self._lock = threading.Lock()              # sealed on the scheduler thread, run on the forward one
        sample = self.kv.view(-1)[:min(8, num_pages) * self.kv[:, 0].numel()]     # 8 pages' bytes
        self.cost = LoadCost(copy_bandwidth(sample, pool.device), self.page_bytes // pool.page_size)

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
        """Copy device pages to host pages (eviction from the device). On the CPU they are copied
        when this returns; on CUDA the copy is queued and whatever may write the device pages next
        waits for it on the device (the caller's stream, `reusers`, forwards through `flush`)."""
        if not device_pages:
            return
        host_pages, device_pages = by_host_page(host_pages, device_pages, last_wins=True)
        if self.on_cuda:
            self._gathered, copies = write_cuda(self, host_pages, device_pages, self.reusers)
        else:
            copies = write_cpu(self.kv, self.pool.kv, host_pages, device_pages)
        self.num_write_copies += copies
        self.bytes_to_host += len(device_pages) * self.page_bytes
        if self.mirror is not None:
            self.mirror("tier_write", self.num_pages, host_pages, device_pages)

    # ---- host -> device, before the next forward -----------------------------------
    def load(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Queue a copy of host pages into device pages (a hit on the host tier)."""
        if device_pages:
            with self._lock:
                self._pending.append((list(host_pages), list(device_pages)))
                self._pin(host_pages)
            self.bytes_to_device += len(device_pages) * self.page_bytes
            self.policy.on_load(len(device_pages))

    def cancel_load(self, device_pages: list[int]) -> None:
        """Drop the loads into `device_pages` that have not run (their request was not scheduled,
        or was aborted and the tree evicted the pages): the pages may take other KV at once."""
        drop = set(device_pages)
        with self._lock:
            self._pending = self._without(self._pending, drop)
            self._sealed = [(it, kept) for it, loads in self._sealed if (kept := self._without(loads, drop))]
            if self._by_layer is not None:
                kept = self._without([self._by_layer], drop)
                self._by_layer = kept[0] if kept else ([], [])
            if self._issued:   # NOTE: issued loads land before what the caller's stream does next
                torch.cuda.current_stream(self.pool.device).wait_stream(self.load_stream)
                self._issued = False

    def _without(self, loads, drop: set) -> list[tuple[list[int], list[int]]]:
        kept = []
        for host, dev in loads:
            pairs = [(h, d) for h, d in zip(host, dev) if d not in drop]
            if len(pairs) < len(dev):
                self._unpin([h for h, d in zip(host, dev) if d in drop])
                self.bytes_to_device -= (len(dev) - len(pairs)) * self.page_bytes
            if pairs:
                kept.append(([h for h, _ in pairs], [d for _, d in pairs]))
        return kept

    def seal(self, forward_iter: int) -> None:
        """The loads queued so far precede forward `forward_iter` (called before its launch)."""
        if self._pending:
            with self._lock:
                self._sealed.append((forward_iter, self._pending))
                self._pending = []

    def launching(self, forward_iter: int) -> None:
        """Forward-thread hook: `forward_iter` is the forward about to run."""
        self._launching = forward_iter

    def flush(self, layerwise: bool = False) -> None:
        """Run the loads sealed for forwards up to the one about to run (on the forward thread).
        With `layerwise` (an eager forward that calls `before_layer`) a load of at least
        `layerwise_min_bytes` goes layer by layer: layer i of the forward waits for layer i's
        copy only (on the CPU the copy runs then). On CUDA the forward first waits for the
        write-backs' gathers: it may write pages they read."""
        gathered = self._gathered
        if gathered is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(gathered)
        with self._lock:
            due = [pair for it, loads in self._sealed if it <= self._launching for pair in loads]
            self._sealed = [(it, loads) for it, loads in self._sealed if it > self._launching]
            if not due:
                return
            host = [h for hs, _ in due for h in hs]
            dev = [d for _, ds in due for d in ds]
            if self.mirror is not None:            # NOTE: before this forward goes to the other ranks
                self.mirror("tier_load", self.num_pages, host, dev)
            by_layer = layerwise and len(dev) * self.page_bytes >= self.layerwise_min_bytes
            self.num_layerwise_loads += by_layer
            if not self.on_cuda and by_layer:
                self._by_layer, self._next_layer = (host, dev), 0    # pinned until end_forward
                return
            if not self.on_cuda:
                self._load_all(host, dev)
            else:
                self._issue(host, dev, by_layer)
            self._unpin(host)

    def _issue(self, host: list[int], dev: list[int], by_layer: bool) -> None:
        """CUDA: every layer's copy on the load stream after the forwards launched so far (and after
        the write-backs: a host page written, then loaded); the forward waits for all of them, or
        with `by_layer` for layer i's event before layer i."""
        forward_stream = torch.cuda.current_stream(self.pool.device)
        self.load_stream.wait_stream(forward_stream)
        self.load_stream.wait_stream(self.to_host_stream)
        events = []
        with torch.cuda.stream(self.load_stream):   # NOTE: the index too is the load stream's memory
            plan = self._plan(host, dev)
            for layer in range(self.pool.num_layers):
                self._load_layer(layer, *plan)
                if by_layer:
                    events.append(self.load_stream.record_event())
        if by_layer:
            self._layer_events = events
        else:
            forward_stream.wait_stream(self.load_stream)
        self._issued = True

    def load_now(self, host_pages: list[int], device_pages: list[int]) -> None:
        """A rank other than 0: rank 0's load, before the forward rank 0 sent after it."""
        self._load_all(host_pages, device_pages)
        self.bytes_to_device += len(device_pages) * self.page_bytes

    def _load_all(self, host: list[int], dev: list[int]) -> None:
        plan = self._plan(host, dev)
        for layer in range(self.pool.num_layers):
            self._load_layer(layer, *plan)

    def before_layer(self, layer: int) -> None:
        """Model hook, before decoder layer `layer` of an eager forward: its pages are loaded."""
        if self._layer_events is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(self._layer_events[layer])
        elif self._by_layer is not None:
            with self._lock:
                self._load_layer(layer, *self._plan(*self._by_layer))
                self._next_layer = layer + 1

    def end_forward(self) -> None:
        """After the forward (also one that failed midway): layer-wise loads complete and unpinned."""
        if self._layer_events is not None:
            torch.cuda.current_stream(self.pool.device).wait_stream(self.load_stream)
            self._layer_events = None
        if self._by_layer is not None:
            with self._lock:
                host, dev = self._by_layer
                plan = self._plan(host, dev)
                for layer in range(self._next_layer, self.pool.num_layers):   # the layers a failure skipped
                    self._load_layer(layer, *plan)
                self._unpin(host)
                self._by_layer = None

    def _pin(self, host_pages) -> None:           # under self._lock
        for h in host_pages:
            self.loading[h] = self.loading.get(h, 0) + 1

    def _unpin(self, host_pages) -> None:         # under self._lock
        for h in host_pages:
            if self.loading[h] == 1:
                del self.loading[h]
            else:
                self.loading[h] -= 1

    def _plan(self, host: list[int], dev: list[int]) -> tuple[list, Optional[torch.Tensor]]:
        """(runs of the host pages, device page index) of a load, for `_load_layer`."""
        host, dev = by_host_page(host, dev)
        index = torch.tensor(dev, dtype=torch.int64) if dev else None
        if index is not None and self.on_cuda:     # NOTE: pinned: a pageable copy may wait for the stream
            index = index.pin_memory().to(self.pool.device, non_blocking=True)
        return runs_of(host), index

    def _load_layer(self, layer: int, runs: list, index: Optional[torch.Tensor]) -> None:
        if index is None:
            return
        parts = [self.kv[layer, first:first + n].to(self.pool.device, non_blocking=self.on_cuda)
                 for _, first, n in runs]
        block = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.pool.kv[layer].index_copy_(2, index, block.permute(1, 2, 0, 3, 4))   # [planes, heads, pages, ..]

    def wrap_forward(self, forward):
        """`forward` preceded by `flush` and followed by `end_forward`; a prefill's time feeds the
        cost model: its span on the device once its reader has waited for it (a deferred read,
        `ForwardOutput.wait`: waiting here would hold back the next launch), else its time here."""
        def run(fi):
            self.flush(layerwise=not fi.is_decode)
            try:
                if fi.is_decode:
                    return forward(fi)
                t0 = time.perf_counter()
                out = forward(fi)
                if getattr(out, "ready", None) is not None:
                    self._timed = self._observe_read(self._timed) + [(sum(fi.extend_lens), out)]
                else:
                    self.cost.observe_prefill(sum(fi.extend_lens), time.perf_counter() - t0)
                return out
            finally:
                self.end_forward()
        return run

    def _observe_read(self, timed: list) -> list:
        """Feed the cost model the deferred prefills read since; -> those still unread (the last 8)."""
        for n, out in timed:
            if out.ready is None and "step_s" in out.timings:
                self.cost.observe_prefill(n, out.timings["step_s"])
        return [(n, out) for n, out in timed if out.ready is not None][-8:]


def attach_host_tier(executor, runner, gigabytes: float) -> HostTier:
    """A host tier of `gigabytes` for `runner`'s pool, its loads run by `executor`'s forward thread
    right before the forward they were sealed for (the scheduler seals in `run_batch`), or layer
    by layer inside it (`runner`'s model calls `before_layer`); the wrapper also times prefills
    for its cost model."""
    tier = HostTier.sized(runner.kv_pool, gigabytes)
    fence = getattr(runner, "import_fence", None)
    if tier.on_cuda and fence is not None:         # a decode worker's KV imports may take evicted pages
        with fence.stream():
            tier.reusers.append(torch.cuda.current_stream(tier.pool.device))
    if runner.followers is not None:               # the other ranks keep theirs in step
        tier.mirror = runner.followers.send_tier
    runner.add_layer_gate(tier.before_layer)
    executor.forward_fn = tier.wrap_forward(executor.forward_fn)
    first = executor.on_launch                 # layer-wise streaming's, if any: both run
    executor.on_launch = tier.launching if first is None else \
        (lambda forward_iter: (first(forward_iter), tier.launching(forward_iter)))
    return tier
