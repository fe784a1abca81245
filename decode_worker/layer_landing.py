"""LayerLanding: the layers of each request that landed ahead of its kv_batch (layer-wise).

A `kv_layers` message brings layers [layer, layer + n) of some requests; they land in the
request's reserved pages at once. They arrive in order (ZeroMQ keeps one peer's messages in
order), so a request's progress is one count per KV attempt; a newer attempt starts over. The
kv_batch item then says how many layers went ahead (`layers_sent`): fewer landed, or a layer
that failed, fails the request's KV like a bad checksum would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cluster.kv_transfer import KvTransferError


@dataclass(slots=True)
class _Progress:
    attempt: int
    layers: int = 0
    num_bytes: int = 0          # landed on every rank (a TP worker's other ranks count at the last layer)
    error: Optional[KvTransferError] = None


class LayerLanding:
    def __init__(self) -> None:
        self._landed: dict[str, _Progress] = {}

    def __len__(self) -> int:
        return len(self._landed)

    def expect(self, rid: str, attempt: int, layer: int) -> None:
        """Layer `layer` of attempt `attempt` is about to land; raises if it is out of order."""
        p = self._landed.get(rid)
        if p is None or p.attempt != attempt:
            p = self._landed[rid] = _Progress(attempt)
        if p.error is not None:
            raise p.error
        if layer != p.layers:
            raise KvTransferError("layers", f"layer {layer} arrived after {p.layers} layers")

    def landed(self, rid: str, num_layers: int, num_bytes: int) -> None:
        p = self._landed[rid]
        p.layers += num_layers
        p.num_bytes += num_bytes

    def failed(self, rid: str, attempt: int, error: KvTransferError) -> None:
        p = self._landed.get(rid)
        if p is None or p.attempt != attempt:
            p = self._landed[rid] = _Progress(attempt)
        p.error = p.error or error

    def take(self, rid: str, attempt: int, layers_sent: int) -> int:
        """The kv_batch item says `layers_sent` went ahead: raises unless exactly those landed;
        -> the bytes they brought."""
        p = self._landed.pop(rid, None)
        got = p.layers if p is not None and p.attempt == attempt else 0
        if p is not None and p.attempt == attempt and p.error is not None:
            raise p.error
        if got != layers_sent:
            raise KvTransferError("layers", f"{got} of the {layers_sent} layers sent ahead landed")
        return p.num_bytes if p is not None else 0

    def forget(self, rid: str) -> None:
        self._landed.pop(rid, None)
