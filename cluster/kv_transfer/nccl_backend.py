"""`nccl`: GPUs on any hosts; point-to-point NCCL send/recv per (prefill, decode) pair.

The prefill worker hosts a TCPStore on its data host (created on first use) and names it in
every kv_batch's `source`; each pair gets its own two-rank `ProcessGroupNCCL` on a prefix of
that store, created lazily on both sides (prefill rank 0, decode rank 1: `PairGroups`). After
the kv_batch leaves, the prefill side posts one send per request, in the message's order, from
a gathered copy of its pages (so its pages are freed at once); the decode side posts the
matching recvs in the same order (ZeroMQ keeps one peer's messages in order), into one device
buffer that is verified and then scattered into the reserved pages on the import stream. A
request decode no longer expects is still received, into a buffer it drops, to keep the pair's
stream aligned.
Layer-wise: each layer's send is posted right after its kv_layers message (on the stream that
staged it), and decode posts the matching recv when it reads that message.
"""
from __future__ import annotations

import datetime
import logging
import os
import threading
from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import ImportFence, Packed
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender

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


class PairGroups:
    """One side's two-rank NCCL groups, one per (prefill, decode) pair, made on first use."""

    def __init__(self, worker_id: str, rank: int):
        self.worker_id, self.rank = worker_id, rank
        self._groups: dict[str, object] = {}          # pair prefix -> ProcessGroupNCCL
        self._lock = threading.Lock()

    def get(self, prefix: str, source: dict, store=None):
        with self._lock:
            group = self._groups.get(prefix)
            if group is None:
                group = self._groups[prefix] = _pair_group(source["host"], source["port"], prefix,
                                                           self.rank, store)
                logger.info("%s: NCCL pair group %s (rank %d)", self.worker_id, prefix, self.rank)
        return group

    def clear(self) -> None:
        self._groups.clear()


class NcclSender(KvSender):
    name = "nccl"
    stages_layers = True

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True, data_host: str = "127.0.0.1"):
        super().__init__(pool, worker_id, verify)
        self.data_host = data_host
        self._store = None
        self._groups = PairGroups(worker_id, rank=0)
        self._in_flight: list[tuple[torch.Tensor, object]] = []   # sends whose buffers must live
        self._lock = threading.Lock()      # layer sends come from the layer streamer's thread

    def source(self) -> dict:
        with self._lock:
            if self._store is None:
                import torch.distributed as dist
                self._store = dist.TCPStore(self.data_host, 0, is_master=True, wait_for_workers=False,
                                            timeout=datetime.timedelta(seconds=PAIR_TIMEOUT_S))
        return {"host": self.data_host, "port": int(self._store.port)}

    def pack(self, pages: list[int], length: int) -> Packed:
        kv = self.pool.export_kv(pages, length)
        return Packed(self.checksum_of(kv), kv.numel() * kv.element_size(), tensor=kv)

    def _send(self, peer: str, tensor: torch.Tensor) -> None:
        # NOTE: not under the lock (a first send waits for the peer to join); one pair's sends
        # stay in message order because a kv_batch leaves only after its layers' sends
        source = self.source()
        group = self._groups.get(f"{self.worker_id}>{peer}", source, self._store)
        work = group.send([tensor], 1, 0)
        with self._lock:
            self._in_flight = [(t, w) for t, w in self._in_flight if not w.is_completed()]
            self._in_flight.append((tensor, work))

    def send_layer(self, peer: str, staged, layer: int) -> None:
        self._send(peer, staged.tensor[layer:layer + 1])    # on the caller's (copy) stream

    def after_send(self, peer: str, packed: list[Packed]) -> None:
        for p in packed:
            if p.tensor is not None and p.tensor.numel():   # streamed requests sent theirs already
                self._send(peer, p.tensor)

    def close(self) -> None:
        self._in_flight.clear()
        self._groups.clear()


class NcclReceiver(KvReceiver):
    name = "nccl"

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True,
                 fence: Optional[ImportFence] = None, data_addr: str = ""):
        super().__init__(pool, worker_id, verify, fence)
        self.data_addr = data_addr         # this worker's data-plane address: names its pairs
        self._groups = PairGroups(worker_id, rank=1)

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        first, end, whole = self.layer_span(layers)
        if first == end:
            return 0
        group = self._groups.get(f"{sender}>{self.data_addr}", source)
        pool, length = self.pool, item.transfer_len
        with self.fence.stream():
            buf = torch.empty(pool.handoff_shape(length, end - first),
                              dtype=pool.dtype, device=pool.device)
            group.recv([buf], 0, 0).wait()
            if dst_pages is None:
                return 0
            if whole:
                self.check(item.checksum, lambda: self.checksum_of(buf))
                pool.import_kv(dst_pages, buf)
            else:
                pool.import_kv(dst_pages, buf, first_layer=first)
        self.fence.record()
        return buf.numel() * buf.element_size()

    def close(self) -> None:
        self._groups.clear()
