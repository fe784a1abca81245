"""KvReceiver: the decode half of a KV transfer backend.

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
                                     reads the pages (`ImportFence`)
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import ImportFence, KvTransferError
from cluster.kv_transfer.checksum import kv_checksum


class KvReceiver:
    name = "base"

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True,
                 fence: Optional[ImportFence] = None):
        self.pool, self.worker_id, self.verify = pool, worker_id, verify
        self.fence = fence or ImportFence(pool.device)

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        raise NotImplementedError

    def verify_landed(self, item, dst_pages: list[int]) -> None:
        """Every layer of a streamed request landed: its checksum over the pages (on CUDA on the
        import stream, after the copies)."""
        with self.fence.stream():
            self.check(item.checksum, lambda: self.landed_checksum(dst_pages, item.transfer_len))

    def landed_checksum(self, pages: list[int], length: int) -> int:
        return kv_checksum(self.pool.export_kv(pages, length))

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
        """Release mapped peers."""
