"""The page-reading backends (shm, cuda_ipc): decode reads the prefill pool in place.

No bytes travel with the kv_batch: its item names the request's pages in the prefill pool
(`src_pages`), which stay allocated until kv_ack, and carries the checksum over them. The
decode side maps each peer's pool once (a restarted peer replaces its old mapping), checks
the source pages against the item's length and both pools' shapes, and copies them straight
into the pages it reserved (`page_copy.py`; on CUDA on the import stream).
A backend says how a pool's pages are checksummed (`pages_checksum`), how a peer's pool is
opened (`open_peer`) and what names one mapping of it (`peer_key`).
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransferError, Packed
from cluster.kv_transfer.page_copy import copy_pages
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender


def boot_id() -> str:
    """Same value on every process of one running kernel: 'same host' for shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class PageReadingSender(KvSender):
    holds_pages = True

    def pages_checksum(self, pages: list[int], length: int) -> int:
        raise NotImplementedError

    def pack(self, pages: list[int], length: int) -> Packed:
        # NOTE: the prefill forward that wrote these pages has finished: its sampled tokens
        # were read on the host before this runs
        checksum = self.pages_checksum(pages, length) if self.verify else None
        return Packed(checksum, self.pool.request_bytes(length), src_pages=list(pages[:self.pool.pages_for(length)]))


class PageReadingReceiver(KvReceiver):
    peer_kind = "KV pool"          # what is opened, for the error that says it could not be

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True, fence=None):
        super().__init__(pool, worker_id, verify, fence)
        self._peers: dict[tuple, torch.Tensor] = {}    # (sender, *peer_key) -> its pool

    def open_peer(self, source: dict) -> torch.Tensor:
        """The peer's pool `source` describes, mapped into this process."""
        raise NotImplementedError

    def peer_key(self, source: dict) -> tuple:
        raise NotImplementedError

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        if dst_pages is None:
            return 0
        if source.get("boot_id") != boot_id():
            raise KvTransferError("unreachable", f"{sender}'s {self.peer_kind} is on another host")
        first, end, whole = self.layer_span(layers)
        src = self._map(sender, source)
        src_pages, length = self.source_pages(sender, src, item), item.transfer_len
        with self.fence.stream():
            copy_pages(src[first:end], self.pool.kv[first:end], src_pages, dst_pages[:len(src_pages)])
            if whole:
                self.check(item.checksum, lambda: self.landed_checksum(dst_pages, length))
        return self.pool.request_bytes(length) * (end - first) // self.pool.num_layers

    def source_pages(self, sender: str, src: torch.Tensor, item) -> list[int]:
        """The item's pages in the peer's pool `src`, checked against its length and against
        both pools' shapes."""
        src_pages, length = item.src_pages or [], item.transfer_len
        if len(src_pages) != self.pool.pages_for(length) or max(src_pages, default=0) >= src.shape[3]:
            raise KvTransferError("shape", f"{len(src_pages)} source pages for {length} tokens")
        if src.shape[0] != self.pool.num_layers:
            raise KvTransferError("shape", f"{sender}'s pool has {src.shape[0]} layers, this one "
                                  f"{self.pool.num_layers}")
        return src_pages

    def _map(self, sender: str, source: dict) -> torch.Tensor:
        key = (sender, *self.peer_key(source))
        src = self._peers.get(key)
        if src is None:
            try:
                src = self.open_peer(source)
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise KvTransferError("unreachable", f"cannot open {sender}'s {self.peer_kind}: {e}") from None
            self._peers = {k: v for k, v in self._peers.items() if k[0] != sender}   # a restarted peer
            self._peers[key] = src
        return src

    def close(self) -> None:
        self._peers.clear()
