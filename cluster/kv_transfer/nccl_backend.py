"""`nccl`: GPUs on any hosts; point-to-point NCCL send/recv per (prefill, decode) pair.

The prefill worker hosts a TCPStore on its data host (created on first use) and names it in
every kv_batch's `source`; each pair gets its own two-rank `ProcessGroupNCCL` on a prefix of
that store, created lazily on both sides (prefill rank 0, decode rank 1). After the kv_batch
leaves, the prefill side posts one send per request, in the message's order, from a gathered
copy of its pages (so its pages are freed at once); the decode side posts the matching recvs
in the same order (ZeroMQ keeps one peer's messages in order), into one device buffer that is
verified and then scattered into the reserved pages on the import stream. A request decode no
longer expects is still received, into a buffer it drops, to keep the pair's stream aligned.
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransfer, Packed

logger = logging.getLogger("pdcluster.kv_transfer")
PAIR_TIMEOUT_S = 120.0


def _pair_group(host: str, port: int, prefix: str, rank: int, is_master_store=None):
    import torch.distributed as dist
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")       # no NVLink multicast
    timeout = datetime.timedelta(seconds=PAIR_TIMEOUT_S)
    store = is_master_store or dist.TCPStore(host, port, is_master=False, timeout=timeout)
    opts = dist.ProcessGroupNCCL.Options()
    try:
        opts._timeout = timeout
    except AttributeError:                               # older torch: the default timeout
        pass
    return dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, 2, opts)


class NcclTransfer(KvTransfer):
    name = "nccl"
    stages_layers = True

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True, fence=None,
                 data_host: str = "127.0.0.1"):
        super().__init__(pool, worker_id, verify, fence)
        self.data_host = data_host
        self._store = None
        self._groups: dict[str, object] = {}          # pair prefix -> ProcessGroupNCCL
        self._in_flight: list[tuple[torch.Tensor, object]] = []   # sends whose buffers must live

    def source(self) -> dict:
        if self._store is None:
            import torch.distributed as dist
            self._store = dist.TCPStore(self.data_host, 0, is_master=True, wait_for_workers=False,
                                        timeout=datetime.timedelta(seconds=PAIR_TIMEOUT_S))
        return {"host": self.data_host, "port": int(self._store.port)}

    def pack(self, pages: list[int], length: int) -> Packed:
        kv = self.pool.export_kv(pages, length)
        return Packed(self.checksum_of(kv), kv.numel() * kv.element_size(), tensor=kv)

    def after_send(self, peer: str, packed: list[Packed]) -> None:
        prefix = f"{self.worker_id}>{peer}"
        group = self._groups.get(prefix)
        if group is None:
            source = self.source()
            group = self._groups[prefix] = _pair_group(source["host"], source["port"], prefix, 0, self._store)
            logger.info("%s: NCCL pair group with %s", self.worker_id, peer)
        self._in_flight = [(t, w) for t, w in self._in_flight if not w.is_completed()]
        for p in packed:
            self._in_flight.append((p.tensor, group.send([p.tensor], 1, 0)))

    def unpack(self, sender: str, source: dict, item: "KvReq", payload, dst_pages: Optional[list[int]]) -> int:
        prefix = f"{sender}>{self.data_addr}"
        group = self._groups.get(prefix)
        if group is None:
            group = self._groups[prefix] = _pair_group(source["host"], source["port"], prefix, 1)
            logger.info("%s: NCCL pair group with %s", self.worker_id, sender)
        pool, length = self.pool, item.prompt_len
        with self.fence.stream():
            buf = torch.empty((pool.num_layers, 2, length, pool.num_kv_heads, pool.head_dim),
                              dtype=pool.dtype, device=pool.device)
            group.recv([buf], 0, 0).wait()
            if dst_pages is None:
                return 0
            self.check(item.checksum, lambda: self.checksum_of(buf))
            pool.import_kv(dst_pages, buf)
        self.fence.record()
        return buf.numel() * buf.element_size()

    def close(self) -> None:
        self._in_flight.clear()
        self._groups.clear()
