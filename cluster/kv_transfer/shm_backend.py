"""`shm`: CPU workers on one host; the decode side reads the prefill pool in place.

The prefill worker's KV pool lives in one shared-memory segment (`SharedSegment`, a memfd):
its registered memory. A decode worker maps it once, through `/proc/<pid>/fd/<fd>`, and copies
a request's pages straight from the prefill pages into its reserved pages (`page_copy.py`:
one strided copy per run of consecutive pages). The prefill pages stay allocated until
kv_ack. A memfd has no name in /dev/shm, so nothing leaks when a worker dies: the kernel frees
the segment with the last process that maps it.
"""
from __future__ import annotations

import math
import mmap
import os
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransfer, KvTransferError, Packed
from cluster.kv_transfer.checksum import xxh3_pages
from cluster.kv_transfer.page_copy import copy_pages
from cluster.wire.tensor_frames import DTYPE_NAMES, DTYPES


def boot_id() -> str:
    """Same value on every process of one running kernel: 'same host' for shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class SharedSegment:
    """An anonymous shared-memory file mapped into this process."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.fd = os.memfd_create("pdcluster-kv", 0)
        os.ftruncate(self.fd, max(1, nbytes))
        self.map = mmap.mmap(self.fd, max(1, nbytes))

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape) * dtype.itemsize
        return torch.frombuffer(self.map, dtype=torch.uint8, count=count).view(dtype).view(shape)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:     # tensors still view it; the process exit frees it
            pass
        os.close(self.fd)


def shared_pool_storage(shape, dtype: torch.dtype) -> tuple[torch.Tensor, SharedSegment]:
    """A zeroed pool tensor in a fresh segment (for KVPool(storage=...))."""
    seg = SharedSegment(math.prod(shape) * dtype.itemsize)
    return seg.tensor(shape, dtype), seg


class _Mapping:
    """A peer's pool, mapped read-write (only read) into this process."""

    def __init__(self, source: dict):
        path = f"/proc/{source['pid']}/fd/{source['fd']}"
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, source["nbytes"])
        finally:
            os.close(fd)
        self.kv = torch.frombuffer(self.map, dtype=torch.uint8, count=source["nbytes"]) \
            .view(DTYPES[source["dtype"]]).view(source["shape"])


class ShmTransfer(KvTransfer):
    name = "shm"
    holds_pages = True

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True, fence=None,
                 segment: Optional[SharedSegment] = None):
        super().__init__(pool, worker_id, verify, fence)
        self.segment = segment                      # None on the decode side
        self._peers: dict[tuple, _Mapping] = {}

    def source(self) -> dict:
        if self.segment is None:
            raise RuntimeError("shm: this worker's KV pool is not in a shared segment")
        return {"pid": os.getpid(), "fd": self.segment.fd, "nbytes": self.pool.num_bytes,
                "shape": list(self.pool.kv.shape), "dtype": DTYPE_NAMES[self.pool.dtype],
                "boot_id": boot_id()}

    def pack(self, pages: list[int], length: int) -> Packed:
        num = self.pool.pages_for(length)
        checksum = xxh3_pages(self.pool.kv, pages, length) if self.verify else None
        return Packed(checksum, self.pool.request_bytes(length), src_pages=list(pages[:num]))

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        if dst_pages is None:
            return 0
        if source.get("boot_id") != boot_id():
            raise KvTransferError("unreachable", f"{sender}'s shared memory is on another host")
        first, end, whole = self.layer_span(layers)
        peer = self._map(sender, source)
        src_pages, length = self.source_pages(sender, peer.kv, item), item.transfer_len
        copy_pages(peer.kv[first:end], self.pool.kv[first:end], src_pages, dst_pages[:len(src_pages)])
        if whole:
            self.check(item.checksum, lambda: self.landed_checksum(dst_pages, length))
        return self.pool.request_bytes(length) * (end - first) // self.pool.num_layers

    def landed_checksum(self, pages: list[int], length: int) -> int:
        return xxh3_pages(self.pool.kv, pages, length)

    def _map(self, sender: str, source: dict) -> _Mapping:
        key = (sender, source["pid"], source["fd"], source["nbytes"])
        peer = self._peers.get(key)
        if peer is None:
            try:
                peer = _Mapping(source)
            except (OSError, ValueError, KeyError) as e:
                raise KvTransferError("unreachable", f"cannot map {sender}'s KV pool: {e}") from None
            self._peers = {k: v for k, v in self._peers.items() if k[0] != sender}   # a restarted peer
            self._peers[key] = peer
        return peer

    def close(self) -> None:
        self._peers.clear()
