"""KvSender: the prefill half of a KV transfer backend (the pool is registered at construction).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransferError, Packed
from cluster.kv_transfer.checksum import kv_checksum


@dataclass(slots=True)
class Staged:
    """One request's KV being gathered layer by layer into handoff layout (layer-wise)."""
    pages: list[int]
    length: int
    tensor: Optional[torch.Tensor] = None    # pool.handoff_shape(length) on the pool's device
    rows: Optional[torch.Tensor] = None      # handoff row ids per layer: [layers, rows]
    host: Optional[torch.Tensor] = None      # pinned copy (zmq on CUDA)
    layers_done: int = 0


class KvSender:
    name = "base"
    holds_pages = False
    stages_layers = False        # layer-wise: the bytes travel, so each layer is gathered early
    stages_to_host = False       # ... and on CUDA copied into pinned host memory too (zmq)

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True):
        self.pool, self.worker_id, self.verify = pool, worker_id, verify

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

    def checksum_of(self, kv: torch.Tensor) -> Optional[int]:
        return kv_checksum(kv) if self.verify else None

    def close(self) -> None:
        """Release registered memory and peers."""
