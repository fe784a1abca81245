"""What both halves of a KV transfer backend share: the error, a packed request, the import fence.

A backend is two halves (`sender.py`, `receiver.py`): a prefill worker packs and sends with
the `KvSender`, a decode worker lands what arrives with the `KvReceiver`. Both halves of
every backend (zmq, shm, cuda_ipc, nccl) live in its module; `TransferHub` builds the half
a worker needs per peer. `ImportFence` orders a decode worker's KV imports before the
forwards that read them.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

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
