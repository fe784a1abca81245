"""The KV transfer interface every backend implements, and the import fence.

Prefill side (the pool is registered at construction):
    source() -> dict                 what a decode worker needs to reach this pool
                                     (shm segment, CUDA IPC handle, NCCL store), in kv_batch
    pack(pages, length) -> Packed    one request's KV made ready to travel: its checksum, and
                                     either a tensor (the bytes travel) or its source pages
                                     (the decode side reads them in place)
    after_send(peer, packed)         called once the kv_batch left (NCCL sends the bytes now)
    begin / stage_layer / finish     layer-wise (`layerwise.py`): `pack` split by layer; backends
                                     whose bytes travel (`stages_layers`) gather each layer as
                                     soon as it is computed, and each layer leaves at once in a
                                     kv_layers message (`layer_payload`, `send_layer`)
    holds_pages                      True: the prefill pages stay allocated until kv_ack
Decode side:
    unpack(sender, source, item, payload, dst_pages, layers=None) -> bytes landed
                                     write one request's KV into the pages it reserved and
                                     verify it; raises KvTransferError(reason) on a mismatch
                                     (the pages are then not live: the request is prefilled
                                     again). `dst_pages` None: the request is no longer
                                     expected; the backend only keeps its stream in order.
                                     `layers` (first, end): only those layers (a kv_layers
                                     message, or the rest after them), not verified
    verify_landed(item, dst_pages)   after the last layers landed: the checksum over the pages
    fence                            on CUDA, orders the imports before the forward that
                                     reads the pages (ImportFence below)
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.checksum import kv_checksum
from cluster.wire.messages import KvFailure


class KvTransferError(RuntimeError):
    """A request's KV did not arrive intact, for a `KvFailure` reason (a raise with any other
    reason fails at once) that travels typed in the `kv_ack`."""

    def __init__(self, reason: KvFailure | str, detail: str):
        self.reason, self.detail = KvFailure(reason), detail
        super().__init__(f"{self.reason.value}: {detail}")


@dataclass(slots=True)
class Packed:
    checksum: Optional[int]                  # None: verify is off
    num_bytes: int
    tensor: Optional[torch.Tensor] = None    # the bytes that travel (zmq frames, nccl send)
    src_pages: Optional[list[int]] = None    # read in place by the decode side (shm, cuda_ipc)
    layers_sent: int = 0                     # leading layers that already left (layer-wise)


@dataclass
class ImportFence:
    """KV imports run on their own CUDA stream; the forward stream waits on their events.

    `record()` after a batch of imports; the forward calls `wait()` on its own stream before
    reading pages; `synchronize()` before telling the prefill side it may reuse its pages.
    On the CPU every call is a no-op: the copies already happened.
    """
    device: torch.device
    _events: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stream: Any = None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def stream(self):
        if not self.on_cuda:
            import contextlib
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        return torch.cuda.stream(self._stream)

    def record(self) -> Optional[Any]:
        if not self.on_cuda or self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        with self._lock:
            self._events.append(event)
        return event

    def wait(self) -> None:
        """On the forward's stream: wait for every import recorded so far."""
        if not self.on_cuda:
            return
        with self._lock:
            events, self._events = self._events, []
        stream = torch.cuda.current_stream(self.device)
        for event in events:
            stream.wait_event(event)

    def synchronize(self) -> None:
        """Wait until every import issued so far has landed."""
        if self._stream is not None:
            self._stream.synchronize()


@dataclass(slots=True)
class Staged:
    """One request's KV being gathered layer by layer into handoff layout (layer-wise)."""
    pages: list[int]
    length: int
    tensor: Optional[torch.Tensor] = None    # pool.handoff_shape(length) on the pool's device
    rows: Optional[torch.Tensor] = None      # handoff row ids per layer: [layers, rows]
    host: Optional[torch.Tensor] = None      # pinned copy (zmq on CUDA)
    layers_done: int = 0


class KvTransfer:
    name = "base"
    holds_pages = False
    stages_layers = False        # layer-wise: the bytes travel, so each layer is gathered early
    stages_to_host = False       # ... and on CUDA copied into pinned host memory too (zmq)

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True,
                 fence: Optional[ImportFence] = None):
        self.pool, self.worker_id, self.verify = pool, worker_id, verify
        self.fence = fence or ImportFence(pool.device)

    # prefill side
    def source(self) -> dict:
        return {}

    def pack(self, pages: list[int], length: int) -> Packed:
        raise NotImplementedError

    def corrupt(self, packed: Packed) -> None:
        """Fault injection: the bytes (when they still travel) or else the checksum stop matching."""
        if packed.tensor is not None and packed.tensor.numel():
            packed.tensor.view(-1)[:1].add_(1)
        elif packed.checksum is not None:
            packed.checksum ^= 1

    def begin(self, pages: list[int], length: int) -> Staged:
        staged = Staged(list(pages), length)
        if self.stages_layers:
            pool = self.pool
            shape = pool.handoff_shape(length)
            staged.tensor = torch.empty(shape, dtype=pool.dtype, device=pool.device)
            staged.rows = pool.handoff_rows(pages, length).view(pool.num_layers, -1)
            if self.stages_to_host and pool.device.type == "cuda":
                staged.host = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
        return staged

    def stage_layer(self, staged: Staged, layer: int) -> None:
        """Layer `layer` of the pool is final for this request: gather it (on CUDA, on the
        caller's stream, which waits for the layer's event)."""
        if staged.tensor is not None:
            flat = self.pool.kv.view(-1, self.pool.head_dim)
            out = staged.tensor[layer].view(-1, self.pool.head_dim)
            torch.index_select(flat, 0, staged.rows[layer], out=out)
            if staged.host is not None:
                staged.host[layer].copy_(staged.tensor[layer], non_blocking=True)
        staged.layers_done += 1

    def layer_payload(self, staged: Staged, layer: int) -> Optional[torch.Tensor]:
        """What a kv_layers message carries for this request's layer (zmq: the bytes)."""
        return None

    def send_layer(self, peer: str, staged: Staged, layer: int) -> None:
        """The kv_layers message for `layer` has been handed to the data plane (nccl sends now)."""

    def finish(self, staged: Staged) -> Packed:
        """Every layer staged and sent (on CUDA, synchronized): the request's Packed, whose
        kv_batch item carries the checksum over every layer and moves no bytes."""
        layers = self.pool.num_layers
        if staged.layers_done != layers:
            raise KvTransferError("layers", f"{staged.layers_done} of {layers} layers staged")
        if staged.tensor is None:                # read in place: the checksum over the pages
            packed = self.pack(staged.pages, staged.length)
        else:
            kv = staged.tensor
            packed = Packed(self.checksum_of(kv), kv.numel() * kv.element_size(), tensor=self.rest_of(staged))
        packed.layers_sent = layers
        return packed

    def rest_of(self, staged: Staged) -> Optional[torch.Tensor]:
        """What of a streamed request travels with its kv_batch: nothing (zmq: zero layers)."""
        return None

    def after_send(self, peer: str, packed: list[Packed]) -> None:
        """The kv_batch carrying `packed` has been handed to the data plane."""

    # decode side
    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        raise NotImplementedError

    def verify_landed(self, item, dst_pages: list[int]) -> None:
        """Every layer of a streamed request landed: its checksum over the pages (on CUDA on the
        import stream, after the copies)."""
        with self.fence.stream():
            self.check(item.checksum, lambda: self.landed_checksum(dst_pages, item.transfer_len))

    def landed_checksum(self, pages: list[int], length: int) -> int:
        return self.checksum_of(self.pool.export_kv(pages, length))

    def source_pages(self, sender: str, src: torch.Tensor, item) -> list[int]:
        """Page-reading backends (shm, cuda_ipc): the item's pages in the peer's pool `src`,
        checked against its length and against both pools' shapes."""
        src_pages, length = item.src_pages or [], item.transfer_len
        if len(src_pages) != self.pool.pages_for(length) or max(src_pages, default=0) >= src.shape[3]:
            raise KvTransferError("shape", f"{len(src_pages)} source pages for {length} tokens")
        if src.shape[0] != self.pool.num_layers:
            raise KvTransferError("shape", f"{sender}'s pool has {src.shape[0]} layers, this one "
                                  f"{self.pool.num_layers}")
        return src_pages

    def layer_span(self, layers: Optional[tuple[int, int]]) -> tuple[int, int, bool]:
        """(first, end, whole): the layers an unpack moves; `whole` ones are verified there."""
        if layers is None:
            return 0, self.pool.num_layers, True
        first, end = layers
        if not 0 <= first <= end <= self.pool.num_layers:
            raise KvTransferError("shape", f"layers [{first}, {end}) of a {self.pool.num_layers}-layer pool")
        return first, end, False

    def check(self, expected: Optional[int], got_fn) -> None:
        """Compare checksums when verify is on and the sender sent one."""
        if not self.verify or expected is None:
            return
        got = got_fn()
        if got != expected:
            raise KvTransferError("checksum", f"KV checksum {got:#018x} != sent {expected:#018x}")

    def checksum_of(self, kv: torch.Tensor) -> Optional[int]:
        return kv_checksum(kv) if self.verify else None

    def close(self) -> None:
        """Release registered memory and peers."""
