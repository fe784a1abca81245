"""Layer-wise KV streaming (`[kv_transfer] layerwise = true`), prefill side.

The model calls `on_layer(i)` after each decoder layer (the prefill scheduler registers it
with `ModelRunner.add_layer_listener`). Before a prefill forward is launched, the scheduler
`plan`s it: the requests whose last chunk it computes, each with its backend, pages, decode
peer and the `KvSpan` naming its KV. Right before a forward runs, the executor names its
iteration (`launching`), which selects its plan:
a plan whose forward never ran (its build or launch failed) is dropped, never reused. After
layer i the streamer (one thread; on CUDA its own copy stream, waiting on the event recorded
after layer i's kernels) stages layer i of each planned request (`KvSender.stage_layer`:
gathered into handoff layout, on CUDA also copied to pinned host memory for zmq), waits
until it is final, and sends it at once: one `kv_layers` message per decode peer, while layers
i+1.. still compute. What travels per backend:
    zmq        the layer's bytes, as the message's frames
    nccl       an NCCL send of the gathered layer, posted right after the message
    shm,       nothing but the message: decode copies layer i of the request's pages from the
    cuda_ipc   mapped prefill pool when it reads it (the pages stay held until kv_ack)
After the forward, `finish(rid)` waits for the request's layers and returns the Packed its
kv_batch item carries: the checksum over all layers, `layers_sent`, and no bytes; decode
starts the request only once that kv_batch, hence the last layer, has landed.
Chunked prefill: the last chunk's forward streams every position of each layer (earlier
chunks' KV of layer i is already in the pool), so the whole request travels once, at the end.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cluster.kv_transfer.base import KvTransferError, Packed
from cluster.kv_transfer.sender import KvSender, Staged
from cluster.wire.protocol import KvLayers, KvSpan

FINISH_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Planned:
    """One request a forward completes: where its KV goes and what it is."""
    backend: KvSender
    pages: list
    length: int
    peer: str                   # the decode worker's data-plane address
    span: KvSpan


@dataclass(slots=True)
class _Entry:
    planned: Planned
    staged: Staged
    jobs: list = field(default_factory=list)       # one Future per layer
    sent_at: list = field(default_factory=list)    # time.monotonic() when each layer left


class LayerStream:
    def __init__(self, num_layers: int, device: torch.device, worker_id: str,
                 send: Callable[[str, KvLayers], None]):
        self.device, self.worker_id, self.send = device, worker_id, send
        self._plans: deque = deque()                 # per forward: (forward_iter, [Planned])
        self._entries: dict[str, _Entry] = {}
        self._current: list[_Entry] = []
        self._forward_iter = 0                       # of the forward now running
        self._lock = threading.Lock()
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="kv-layers")
        self._copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self._last_layer = num_layers - 1

    def plan(self, forward_iter: int, planned: list[Planned]) -> None:
        """Forward `forward_iter`'s requests that complete their prompt (launched in iteration order)."""
        if planned:
            with self._lock:
                self._plans.append((forward_iter, planned))

    # forward thread
    def launching(self, forward_iter: int) -> None:
        """Forward `forward_iter` is about to run: its plan (if any) is the one its layers stream."""
        with self._lock:
            while self._plans and self._plans[0][0] < forward_iter:
                self._plans.popleft()                # its forward failed before running
            plan = self._plans.popleft()[1] if self._plans and self._plans[0][0] == forward_iter else []
            self._forward_iter, self._current = forward_iter, []
            for p in plan:
                entry = _Entry(p, p.backend.begin(p.pages, p.length))
                self._entries[p.span.rid] = entry
                self._current.append(entry)

    def on_layer(self, layer: int) -> None:
        if not self._current:
            return
        event = None
        if self._copy_stream is not None:
            event = torch.cuda.Event()
            event.record()                           # after layer i's kernels on the forward stream
        job = self._exec.submit(self._stream_layer, list(self._current), layer, event, self._forward_iter)
        for entry in self._current:
            entry.jobs.append(job)
        if layer == self._last_layer:
            self._current = []                       # a forward nobody announced streams nothing

    # streamer thread
    @torch.inference_mode()   # NOTE: the staged tensors were made inside the forward's inference mode
    def _stream_layer(self, entries: list[_Entry], layer: int, event, forward_iter: int) -> None:
        if self._copy_stream is None:
            self._stage_and_send(entries, layer, forward_iter)
            return
        self._copy_stream.wait_event(event)
        with torch.cuda.stream(self._copy_stream):
            for e in entries:
                e.planned.backend.stage_layer(e.staged, layer)
            self._copy_stream.synchronize()          # layer i is final (and staged) on the device
            self._send_layer(entries, layer, forward_iter)

    def _stage_and_send(self, entries: list[_Entry], layer: int, forward_iter: int) -> None:
        for e in entries:
            e.planned.backend.stage_layer(e.staged, layer)
        self._send_layer(entries, layer, forward_iter)

    def _send_layer(self, entries: list[_Entry], layer: int, forward_iter: int) -> None:
        """One kv_layers message per (decode peer, backend); then the sends that follow it (nccl)."""
        groups: dict[tuple, list[_Entry]] = {}
        for e in entries:
            groups.setdefault((e.planned.peer, e.planned.backend.name), []).append(e)
        for (peer, _), group in groups.items():
            backend = group[0].planned.backend
            payloads = [backend.layer_payload(e.staged, layer) for e in group]
            self.send(peer, KvLayers(forward_iter=forward_iter, prefill_worker_id=self.worker_id,
                                     layer=layer, num_layers=1, reqs=[e.planned.span for e in group],
                                     tensors=[t for t in payloads if t is not None],
                                     backend=backend.name, source=backend.source()))
            for e in group:
                backend.send_layer(peer, e.staged, layer)
        now = time.monotonic()
        for e in entries:
            e.sent_at.append(now)

    # scheduler thread, after the forward
    def finish(self, rid: str) -> Optional[tuple[Packed, list[float]]]:
        """-> (the request's Packed, when each layer left); None: it was not planned."""
        with self._lock:
            entry = self._entries.pop(rid, None)
        if entry is None:
            return None
        for job in entry.jobs:
            job.result(timeout=FINISH_TIMEOUT_S)
        backend = entry.planned.backend
        if entry.staged.layers_done != backend.pool.num_layers:
            raise KvTransferError("layers", f"{rid}: {entry.staged.layers_done} layers staged")
        return backend.finish(entry.staged), entry.sent_at

    def forget(self, rid: str) -> None:
        with self._lock:
            self._entries.pop(rid, None)

    def close(self) -> None:
        self._exec.shutdown(wait=False, cancel_futures=True)
