"""`shm`: CPU workers on one host; the decode side reads the prefill pool in place.

The prefill worker's KV pool lives in one shared-memory segment (`SharedSegment`, a memfd):
its registered memory. A decode worker maps it once, through `/proc/<pid>/fd/<fd>`, and copies
a request's pages straight from the prefill pages into its reserved pages (`page_reading.py`,
`page_copy.py`: one strided copy per run of consecutive pages). The prefill pages stay
allocated until kv_ack. A memfd has no name in /dev/shm, so nothing leaks when a worker dies:
the kernel frees the segment with the last process that maps it.
"""
from __future__ import annotations

import math
import mmap
import os
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.checksum import xxh3_pages
from cluster.kv_transfer.page_reading import PageReadingReceiver, PageReadingSender, boot_id
from cluster.wire.torch_dtypes import DTYPE_NAMES, DTYPES


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


def map_segment(pid: int, fd: int, nbytes: int, shape: list, dtype: str) -> torch.Tensor:
    """Another process's segment through /proc, mapped read-write (only read) as its pool tensor;
    the tensor keeps the mapping alive."""
    fd = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes).view(DTYPES[dtype]).view(shape)


class ShmSender(PageReadingSender):
    name = "shm"

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True,
                 segment: Optional[SharedSegment] = None):
        super().__init__(pool, worker_id, verify)
        self.segment = segment

    def source(self) -> dict:
        if self.segment is None:
            raise RuntimeError("shm: this worker's KV pool is not in a shared segment")
        return {"pid": os.getpid(), "fd": self.segment.fd, "nbytes": self.pool.num_bytes,
                "shape": list(self.pool.kv.shape), "dtype": DTYPE_NAMES[self.pool.dtype],
                "boot_id": boot_id()}

    def pages_checksum(self, pages: list[int], length: int) -> int:
        return xxh3_pages(self.pool.kv, pages, length)


class ShmReceiver(PageReadingReceiver):
    name = "shm"
    peer_kind = "shared memory"

    def peer_key(self, source: dict) -> tuple:
        return source["pid"], source["fd"], source["nbytes"]

    def open_peer(self, source: dict) -> torch.Tensor:
        return map_segment(source["pid"], source["fd"], source["nbytes"], source["shape"], source["dtype"])

    def landed_checksum(self, pages: list[int], length: int) -> int:
        return xxh3_pages(self.pool.kv, pages, length)
