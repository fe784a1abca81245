"""KV handoff between workers of different tensor-parallel sizes: each decode rank reads its own KV
heads from the prefill ranks that hold them (`head_map.py`), so the bytes that reach a decode rank
are exactly its share, and no rank gathers or relays another rank's heads.

Used whenever either side has more than one rank (tp=1 to tp=1 keeps the single-pool backends).
Why reads, not sends: only rank 0 of a worker owns the data plane and the scheduler, and only decode
rank 0 knows which pages a request reserved; prefill ranks other than 0 know neither the peer nor
the pages. A read needs one fact from each side, both of which the kv_batch already carries: the
source pages (the same page numbers on every prefill rank, whose pools mirror rank 0's allocation)
and the destination pages (the same on every decode rank). As with shm and cuda_ipc, the prefill
pages stay allocated until the kv_ack, which decode sends only once every rank has landed its share.

Transports (the kv_batch's `backend`):
    shm    same host: each prefill rank's pool is its own shared segment; a decode rank maps the
           segments of the ranks it reads (`source`: one pid and fd per rank) and copies the head
           slice of each page run
    zmq    any hosts: each prefill rank serves reads of its pool (`slice_server.py`; `source`: one
           address per rank); a decode rank asks each rank it needs for its head slice of the pages
Layer-wise streaming works as for shm: a kv_layers message names the layers now final and every
decode rank reads those layers.

Decode rank 0 lands its own share and sends each of its other ranks an import job (tp_ranks.py:
the same fields, in order with the forwards, so a rank's import always precedes the forward that
reads the pages); they land theirs and answer. Before the request starts and is acked, rank 0 waits
(bounded) for every rank's answer; any rank's failure fails the request's KV with its reason. A
layout decode cannot map (a head count or split that differs) is refused with reason `layout`.

With `verify`, no single process sees all the heads, so each rank hashes its own (checksum.py,
`head_checksums`): prefill rank 0 asks its other ranks for theirs when it packs the request, and
the item carries the checksum combined over every head; decode ranks hash the heads they landed
and send the values with their answers, and rank 0 combines them and compares.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import zmq

from cluster.kv_transfer.base import KvTransferError, Packed
from cluster.kv_transfer.checksum import combine_head_checksums, head_checksums
from cluster.kv_transfer.head_map import HeadSplit, LayoutError, head_pieces
from cluster.kv_transfer.page_copy import copy_pages
from cluster.kv_transfer.page_reading import boot_id
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender
from cluster.kv_transfer.shm_backend import map_segment
from cluster.kv_transfer.slice_server import SliceClient
from cluster.wire.torch_dtypes import DTYPE_NAMES

logger = logging.getLogger("pdcluster.kv_transfer")

TRANSPORTS = ("shm", "zmq")
MAX_TRACKED = 4096       # requests whose landed bytes are remembered (an aborted one is never settled)


def rank_source(pool, segment=None, server=None) -> dict:
    """How decode ranks reach this rank's pool: its shm segment and its slice server, where it has them."""
    out: dict = {}
    if segment is not None:
        out["shm"] = {"pid": os.getpid(), "fd": segment.fd}
    if server is not None:
        out["zmq"] = server.address
    return out


def kv_source(transport: str, pool, ranks: list[dict]) -> dict:
    """A kv_batch's `source` for a read from `ranks` (rank_source() of each prefill rank, in order)."""
    missing = [r for r, src in enumerate(ranks) if transport not in src]
    if missing:
        raise KvTransferError("backend", f"prefill ranks {missing} have no {transport} source")
    if transport == "zmq":
        return {"ranks": len(ranks), "servers": " ".join(src["zmq"] for src in ranks)}
    return {"ranks": len(ranks), "pid": [src["shm"]["pid"] for src in ranks],
            "fd": [src["shm"]["fd"] for src in ranks], "nbytes": pool.num_bytes,
            "shape": list(pool.kv.shape), "dtype": DTYPE_NAMES[pool.dtype], "boot_id": boot_id()}


class RankReadSender(KvSender):
    """Prefill rank 0's half: names the pages and where each rank's pool is read; moves no bytes."""
    holds_pages = True

    def __init__(self, pool, worker_id: str, transport: str, ranks: list[dict], num_kv_heads: int,
                 verify: bool = False, followers=None, timeout_s: float = 30.0):
        super().__init__(pool, worker_id, verify=verify)
        self.name, self.ranks, self.num_kv_heads = transport, ranks, num_kv_heads
        self.followers, self.timeout_s = followers, timeout_s
        self._source = kv_source(transport, pool, ranks)

    def source(self) -> dict:
        return self._source

    def pack(self, pages: list[int], length: int) -> Packed:
        whole = self.pool.request_bytes(length) * self.num_kv_heads // self.pool.num_kv_heads
        pages = list(pages[:self.pool.pages_for(length)])
        return Packed(self.checksum(pages, length) if self.verify else None, whole, src_pages=pages)

    def checksum(self, pages: list[int], length: int) -> int:
        """The request's KV checksum over every rank's heads (each rank hashes its own)."""
        if self.followers is not None:     # NOTE: first, so the other ranks hash while this one does
            self.followers.send_checksum(pages, length)
        sums = head_checksums(self.pool, pages, length, 0)
        if self.followers is not None:
            sums |= self.followers.collect_checksums(self.timeout_s)
        return combine_head_checksums(sums, self.num_kv_heads)


def import_job(item, dst_pages: list[int], layers: tuple[int, int], verify: bool = False) -> dict:
    """What a decode rank needs to land its share of one request's KV (msgpack-able); `verify`: it
    also hashes its heads once every layer landed."""
    return {"rid": item.rid, "attempt": item.attempt, "tp": item.tp, "heads_per_rank": item.heads_per_rank,
            "src_pages": list(item.src_pages or []), "length": item.transfer_len, "dst_pages": list(dst_pages),
            "layers": list(layers), "verify": verify}


class RankReader:
    """One decode rank's landing of its heads (rank 0 and every other rank run the same code)."""

    def __init__(self, pool, rank: int, tp: int, num_kv_heads: int, timeout_s: float, curve=None):
        self.pool, self.rank = pool, rank
        self.split = HeadSplit(num_kv_heads, tp)
        self.client = SliceClient(timeout_s, curve)
        self._segments: dict[tuple, torch.Tensor] = {}    # (sender, rank, pid, fd) -> mapped pool

    def land(self, transport: str, sender: str, source: dict, job: dict) -> int:
        """Read this rank's heads of `job` into its pages; -> the bytes landed (its share)."""
        try:
            src = HeadSplit.of_rank(self.split.num_kv_heads, job["tp"], job["heads_per_rank"])
            pieces = head_pieces(src, self.split, self.rank)
        except LayoutError as e:
            raise KvTransferError("layout", str(e)) from None
        if source.get("ranks") != src.tp:
            raise KvTransferError("layout", f"a source of {source.get('ranks')} ranks for tp={src.tp}")
        pool, length = self.pool, job["length"]
        src_pages, (first, end) = job["src_pages"], job["layers"]
        num = pool.pages_for(length)
        if len(src_pages) != num or len(job["dst_pages"]) < num:
            raise KvTransferError("shape", f"{len(src_pages)} source pages for {length} tokens")
        dst_pages = job["dst_pages"][:num]
        if first == end:
            return 0          # a kv_batch after layer-wise streaming: every layer already landed
        for p in pieces:
            dst = pool.kv[first:end, :, p.dst_head:p.dst_head + p.count]
            if transport == "shm":
                peer = self._segment(sender, source, p.src_rank)
                copy_pages(peer[first:end, :, p.src_head:p.src_head + p.count], dst, src_pages, dst_pages)
            elif transport == "zmq":
                address = source["servers"].split()[p.src_rank]
                part = self.client.read(address, src_pages, (p.src_head, p.count), (first, end))
                if tuple(part.shape) != (end - first, dst.shape[1], p.count, num, *dst.shape[4:]):
                    raise KvTransferError("shape", f"KV slice {tuple(part.shape)} from {address}")
                idx = torch.tensor(dst_pages, dtype=torch.int64, device=dst.device)
                dst.index_copy_(3, idx, part.to(dst.device, dst.dtype))
            else:
                raise KvTransferError("backend", f"no read of KV heads over {transport!r}")
        return pool.request_bytes(length) * (end - first) // pool.num_layers

    def head_checksums(self, job: dict) -> dict[int, int]:
        """{KV head: checksum} of this rank's heads of `job` as they landed."""
        pages = job["dst_pages"][:self.pool.pages_for(job["length"])]
        return head_checksums(self.pool, pages, job["length"], self.split.first_head(self.rank))

    def _segment(self, sender: str, source: dict, rank: int) -> torch.Tensor:
        if source.get("boot_id") != boot_id():
            raise KvTransferError("unreachable", f"{sender}'s shared memory is on another host")
        pid, fd = source["pid"][rank], source["fd"][rank]
        key = (sender, rank, pid, fd)
        seg = self._segments.get(key)
        if seg is None:
            try:
                seg = map_segment(pid, fd, source["nbytes"], source["shape"], source["dtype"])
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise KvTransferError("unreachable", f"cannot open {sender} rank {rank}'s pool: {e}") from None
            if tuple(seg.shape[:2]) != tuple(self.pool.kv.shape[:2]) or seg.shape[4:] != self.pool.kv.shape[4:]:
                raise KvTransferError("shape", f"{sender}'s pool {tuple(seg.shape)}, this one {tuple(self.pool.kv.shape)}")
            self._segments = {k: v for k, v in self._segments.items() if k[:2] != (sender, rank)}   # restarted
            self._segments[key] = seg
        return seg

    def close(self) -> None:
        self.client.close()
        self._segments.clear()


class RankReadReceiver(KvReceiver):
    """Decode rank 0's half: lands its share, has the other ranks land theirs, and waits for them."""

    def __init__(self, pool, worker_id: str, transport: str, reader: RankReader, followers=None,
                 timeout_s: float = 30.0, fence=None, verify: bool = False):
        super().__init__(pool, worker_id, verify=verify, fence=fence)
        self.name, self.reader, self.followers, self.timeout_s = transport, reader, followers, timeout_s
        self._landed: dict[tuple, int] = {}    # (rid, attempt) -> bytes this rank landed so far

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        """-> the bytes landed: this rank's of these layers, plus at the last layer every other rank's
        whole share (their answers, settled then), so the worker counts every rank's bytes."""
        if dst_pages is None:
            return 0           # nothing is pushed: a request no longer expected is simply not read
        first, end, _ = self.layer_span(layers)
        expected = getattr(item, "checksum", None)      # a kv_layers span has none: its kv_batch verifies
        job = import_job(item, dst_pages, (first, end), verify=self.verify and expected is not None)
        if self.followers is not None:     # NOTE: first, so the other ranks read while this one does
            self.followers.send_import(self.name, sender, source, job)
        key = (item.rid, item.attempt)
        try:
            with self.fence.stream():
                num_bytes = self.reader.land(self.name, sender, source, job)
        except (RuntimeError, ValueError, KeyError, IndexError, zmq.ZMQError) as e:   # its KV fails, not the worker
            if isinstance(e, KvTransferError):
                raise
            raise KvTransferError("backend", f"reading KV heads from {sender}: {type(e).__name__}: {e}") from None
        finally:
            self.fence.record()
        if first < end:
            self._landed[key] = self._landed.pop(key, 0) + num_bytes    # (most recent last)
            while len(self._landed) > MAX_TRACKED:
                self._landed.pop(next(iter(self._landed)))
        if end == self.pool.num_layers:
            per_rank, sums = self.followers.settle(*key, self.timeout_s) if self.followers is not None else ([], {})
            if job["verify"]:
                sums |= self.reader.head_checksums(job)
                self.check(expected, lambda: self.combined(sums))
            if key in self._landed:       # once per KV attempt (not again for a layer-wise kv_batch)
                logger.info("request %s: KV heads from %s landed per rank (bytes): %s%s", item.rid, sender,
                            [self._landed.pop(key), *per_rank], ", checksum verified" if job["verify"] else "")
            return num_bytes + sum(per_rank)
        return num_bytes

    def combined(self, sums: dict[int, int]) -> int:
        try:
            return combine_head_checksums(sums, self.reader.split.num_kv_heads)
        except ValueError as e:
            raise KvTransferError("backend", str(e)) from None

    def verify_landed(self, item, dst_pages: list[int]) -> None:
        """Nothing more: the unpack of a request's last layers verified every rank's heads."""

    def close(self) -> None:
        self.reader.close()
