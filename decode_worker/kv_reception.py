"""KvReception: the receiving side of a KV handoff, shared by decode and DLLM workers.

It owns the transfer queue (requests whose pages are reserved and whose KV has not landed),
the intake that lands `kv_layers` / `kv_batch` in those pages, and the prefill workers'
data addresses. A `kv_batch` is acked once, for every request it carried; the worker says
what a landed request does next (`start`) and how a refused one fails (`fail`): a bad
checksum waits for the prefill worker's next KV attempt instead.
"""
from __future__ import annotations

import logging
from typing import Callable

from cluster.runtime.kv_handoff import KvHandoff
from cluster.runtime.request_marks import MarkBook
from cluster.runtime.schedule_batch import Req
from cluster.wire import protocol as P
from decode_worker.kv_intake import KvIntake, Landed
from decode_worker.transfer_queue import TransferQueue

logger = logging.getLogger("pdcluster.decode")

Start = Callable[[Req, "P.KvReq", "P.KvBatch"], None]
Fail = Callable[..., None]                 # WorkerScheduler.fail(req, reason, retriable=False)


class KvReception:
    def __init__(self, worker_id: str, handoff: KvHandoff, marks: MarkBook, timeouts, page_size: int):
        self.worker_id, self.handoff, self.marks = worker_id, handoff, marks
        self.transfer_queue = TransferQueue(timeouts.decode_ready + timeouts.kv_transfer)
        self.intake = KvIntake(handoff.transfer, self.transfer_queue, page_size)
        self.prefill_addrs: dict[str, str] = {}   # prefill worker id -> data address

    @property
    def own_peer(self) -> "P.Peer":
        """This worker as a prefill worker reaches it (its TP size decides how the KV travels)."""
        return P.Peer(self.worker_id, self.handoff.address, tp=self.handoff.transfer.ranks.size)

    def expect(self, req: Req) -> str:
        """`req`'s pages are reserved: wait for its KV; -> its prefill worker's data address."""
        addr = req.peer.data_addr
        self.prefill_addrs[req.peer.worker_id] = addr
        self.transfer_queue.add(req)
        return addr

    def receive(self, start: Start, fail: Fail) -> None:
        """Land what the data plane brought: layers at once, a kv_batch's requests then started."""
        for sender, msg in self.handoff.received():
            if isinstance(msg, P.KvBatch):
                self.land_batch(msg, start, fail)
            elif isinstance(msg, P.KvLayers):
                self.intake.land_layers(msg)
            else:
                logger.warning("%s: unexpected data-plane message %s from %s",
                               self.worker_id, type(msg).__name__, sender)

    def land_batch(self, msg: "P.KvBatch", start: Start, fail: Fail) -> None:
        """Land each request's KV in its reserved pages, verified, start them, then ack the batch."""
        landed, refused, unexpected = self.intake.land_batch(msg)
        failed = [P.KvFailed(rid, P.KvFailure.NOT_EXPECTED, "aborted or timed out") for rid in unexpected]
        for r in refused:
            self.handoff.stats.count_failure(r.error.reason)
            failed.append(P.KvFailed(r.item.rid, r.error.reason, r.error.detail))
            if r.req is not None and r.error.reason is P.KvFailure.CHECKSUM:   # the prefill worker sends it again
                r.req.kv_attempt = r.item.attempt + 1
                self.transfer_queue.add(r.req)
            elif r.req is not None:
                self.transfer_queue.pop(r.req.rid)
                fail(r.req, f"KV from {msg.prefill_worker_id}: {r.error}")
        for got in landed:
            self.handoff.stats.record(got.num_bytes)   # the prefill side times the transfer
            self.mark_received(got.req, msg, got)
            logger.debug("%s: kv_batch from %s [%d]: %s kv_len=%d bytes=%d via %s", self.worker_id,
                         msg.prefill_worker_id, msg.forward_iter, got.req.rid, got.item.seq_len,
                         got.num_bytes, msg.backend)   # benchmarks/disagg_ttft.py reads it
            self.transfer_queue.pop(got.req.rid)
            start(got.req, got.item, msg)
        self.handoff.send_to(self.prefill_addrs[msg.prefill_worker_id], P.KvAck(
            rids=[got.req.rid for got in landed], failed=failed, decode_worker_id=self.worker_id))

    def mark_received(self, req: Req, msg: "P.KvBatch", got: Landed) -> None:
        ready = self.marks.get(req.rid, "decode_ready") or {}
        self.marks.mark(req.rid, "kv_received", bytes=got.num_bytes, backend=msg.backend,
                        src=msg.prefill_worker_id, src_forward_iter=msg.forward_iter,
                        import_s=round(got.import_s, 6), prealloc_s=ready.get("prealloc_s", 0.0))
        logger.info("request %s: KV from %s batch [%d], %d bytes, imported in %.1f ms%s", req.rid,
                    msg.prefill_worker_id, msg.forward_iter, got.num_bytes, 1000 * got.import_s,
                    f" ({got.item.layers_sent} layers ahead)" if got.item.layers_sent else "")

    def pop_expired(self) -> list[Req]:
        return self.transfer_queue.pop_expired()

    def forget(self, rid: str) -> None:
        self.transfer_queue.remove(rid)
        self.intake.forget(rid)
