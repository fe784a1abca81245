"""Layer-wise KV streaming (`[kv_transfer] layerwise = true`), prefill side.

The model calls `on_layer(i)` after each decoder layer (`LlamaModel.layer_hook`). Before a
prefill forward is launched, the scheduler `plan`s it: the requests whose last chunk it
computes, with their backend, pages and length. After layer i the streamer (one thread; on
CUDA its own copy stream, waiting on the event recorded after layer i's kernels) hands layer
i of each planned request to its backend (`KvTransfer.stage_layer`) while layers i+1.. still
compute. After the forward, `finish(rid)` waits for the request's layers and returns the
Packed the kv_batch carries (checksum over all layers); decode starts the request only once
that kv_batch, hence the last layer, has landed.

What moves early, per backend:
    zmq        each layer gathered into handoff layout (on CUDA also copied device -> pinned
               host) while later layers compute; the frames leave with the kv_batch
    nccl       each layer gathered into the send buffer; the send is posted after the kv_batch
    shm,       nothing: decode reads the prefill pages in place once the kv_batch arrives
    cuda_ipc   (layerwise changes nothing for them; it is accepted and costs nothing)
Chunked prefill: the last chunk's forward stages every position of each layer (earlier
chunks' KV of layer i is already in the pool), so the whole request travels once, at the end.
Plans are consumed one per forward, in launch order (the executor runs forwards one at a time).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from cluster.kv_transfer.base import KvTransfer, KvTransferError, Packed, Staged

FINISH_TIMEOUT_S = 60.0


@dataclass(slots=True)
class _Entry:
    backend: KvTransfer
    staged: Staged
    jobs: list = field(default_factory=list)      # one Future per layer
    staged_at: list = field(default_factory=list)  # perf_counter when each layer was staged


class LayerStream:
    def __init__(self, model, device: torch.device):
        self.device = device
        self._plans: deque = deque()                 # per forward: [(rid, backend, pages, length)]
        self._entries: dict[str, _Entry] = {}
        self._current: list[_Entry] = []
        self._lock = threading.Lock()
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="kv-layers")
        self._copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        model.layer_hook = self.on_layer

    def plan(self, entries: list[tuple[str, KvTransfer, list[int], int]]) -> None:
        """The next forward's requests that complete their prompt (may be empty: one plan per forward)."""
        with self._lock:
            self._plans.append(entries)

    # forward thread
    def on_layer(self, layer: int) -> None:
        if layer == 0:
            with self._lock:
                plan = self._plans.popleft() if self._plans else []
                self._current = []
                for rid, backend, pages, length in plan:
                    entry = _Entry(backend, backend.begin(pages, length))
                    self._entries[rid] = self._current.append(entry) or entry
        if not self._current:
            return
        event = None
        if self._copy_stream is not None:
            event = torch.cuda.Event()
            event.record()                           # after layer i's kernels on the forward stream
        job = self._exec.submit(self._stage, list(self._current), layer, event)
        for entry in self._current:
            entry.jobs.append(job)

    @torch.inference_mode()   # NOTE: the staged tensors were made inside the forward's inference mode
    def _stage(self, entries: list[_Entry], layer: int, event) -> None:
        if self._copy_stream is not None:
            self._copy_stream.wait_event(event)
            with torch.cuda.stream(self._copy_stream):
                for e in entries:
                    e.backend.stage_layer(e.staged, layer)
        else:
            for e in entries:
                e.backend.stage_layer(e.staged, layer)
        now = time.perf_counter()
        for e in entries:
            e.staged_at.append(now)

    # scheduler thread, after the forward
    def finish(self, rid: str) -> Optional[tuple[Packed, list[float]]]:
        """-> (the request's Packed, when each layer was staged); None: it was not planned."""
        with self._lock:
            entry = self._entries.pop(rid, None)
        if entry is None:
            return None
        for job in entry.jobs:
            job.result(timeout=FINISH_TIMEOUT_S)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        if entry.staged.layers_done != entry.backend.pool.num_layers:
            raise KvTransferError("layers", f"{rid}: {entry.staged.layers_done} layers staged")
        return entry.backend.finish(entry.staged), entry.staged_at

    def forget(self, rid: str) -> None:
        with self._lock:
            self._entries.pop(rid, None)

    def close(self) -> None:
        self._exec.shutdown(wait=False, cancel_futures=True)
