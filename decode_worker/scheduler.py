"""DecodeScheduler: prealloc queue -> decode_ready -> transfer queue -> running batch.

Decode never runs a forward over a handed-off prompt: the KV arrives in pages it
reserved, the first token comes from prefill, and its first forward has one new token.
When pages run out the newest requests are retracted: back to the prealloc queue, and once
pages are reserved again a `reprefill` (original sampling parameters + tokens so far) asks
their prefill worker for the KV of the whole sequence.
n > 1: a `generate` with `siblings` is prefilled and handed off once; when its KV lands,
each sibling forks from it (`CacheManager.fork`: whole prompt pages shared, the partial
page copied) at all but the last prompt position, which its first decode step recomputes
to sample its own first token (seeded seed + j). A sibling is then a request like any
other: it finishes, aborts or is retracted (and re-prefilled: itself only) on its own.
Selective disaggregation: a request the router sends without a prefill peer (its
uncached part is short) is prefilled here, extending from this worker's prefix cache,
which holds the KV of the requests it finished.
The KV itself lands through `KvIntake` (kv_intake.py): kv_layers as they come, kv_batch last.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Optional

import torch

from cluster.kv_transfer.page_copy import copy_pages
from cluster.wire import protocol as P
from cluster.wire.gauges import WorkerGauges
from cluster.runtime.decode_manager import DecodeManager
from cluster.runtime.kv_handoff import KvHandoff
from cluster.runtime.stats import DecodeStats
from cluster.runtime.prefill_manager import PrefillManager
from cluster.runtime.schedule_batch import Req, ScheduleBatch
from cluster.runtime.worker_scheduler import WorkerScheduler
from decode_worker.kv_intake import KvIntake, Landed
from decode_worker.prealloc_queue import PreallocQueue
from decode_worker.transfer_queue import TransferQueue

logger = logging.getLogger("pdcluster.decode")

# test-only fault switch: perturb the first received page, to prove the handoff is used
CORRUPT_KV_ENV = "PDCLUSTER_TEST_CORRUPT_KV"


class DecodeScheduler(WorkerScheduler):
    role = "decode"
    supports_prefix_cache = True

    def __init__(self, config, worker_id, runner, control, handoff: KvHandoff, timeouts):
        super().__init__(config, worker_id, runner, control, handoff)
        self.transfer = handoff.transfer
        if runner.import_fence is not self.transfer.fence:   # forwards must wait for the KV imports
            raise ValueError(f"{worker_id}: the model runner's import fence is not the KV transfer's")
        self.prealloc_queue = PreallocQueue(self.cache)
        self.transfer_queue = TransferQueue(timeouts.decode_ready + timeouts.kv_transfer)
        self.decode = DecodeManager(self.cache, on_retract=self.retract, on_fail=self.fail)
        self.intake = KvIntake(self.transfer, self.transfer_queue, self.cache.page_size)
        self.local_prefill = PrefillManager(self.cache, config.max_prefill_tokens, config.max_running_requests)
        self.retracted: set[str] = set()      # rids that must be prefilled again
        self.forks: dict[str, list[Req]] = {}   # rid -> its siblings (n > 1), until its KV lands
        self.prefill_addrs: dict[str, str] = {}   # prefill worker id -> data address
        self.corrupt_kv = os.environ.get(CORRUPT_KV_ENV) == "1"
        if self.corrupt_kv:
            logger.warning("%s: %s=1, received KV will be corrupted (tests only)", worker_id, CORRUPT_KV_ENV)

    # ---- intake ----------------------------------------------------------------
    def admit(self, req: Req, msg) -> None:
        siblings = []
        for j, rid in enumerate(msg.siblings, 1):
            try:
                sampling = msg.sampling.for_choice(j)
            except ValueError as e:                # seed + j out of range
                self.control.send(P.Error(rid=rid, reason=f"rejected: {e}", worker_id=self.worker_id))
                continue
            sibling = self.accept(rid, msg.input_ids, sampling, [], msg.peer)
            if sibling is not None:
                siblings.append(sibling)
        if siblings and (req.peer is None or req.output_ids):
            for sibling in siblings:               # the router sends siblings with a fresh pair only
                self.fail(sibling, "rejected: siblings need a prefill peer and a fresh request")
        elif siblings:
            self.forks[req.rid] = siblings
        if req.peer is None:
            self.local_prefill.add(req)       # short uncached part: prefill it here
            return
        self.marks.note(req.rid, "admitted", t=time.time())
        self.prealloc_queue.add(req)

    def recv_data(self) -> None:
        for sender, msg in self.handoff.received():
            if isinstance(msg, P.KvBatch):
                self.handle_kv_batch(msg)
            elif isinstance(msg, P.KvLayers):
                self.intake.land_layers(msg)
            else:
                logger.warning("%s: unexpected data-plane message %s from %s",
                               self.worker_id, type(msg).__name__, sender)

    def handle_kv_batch(self, msg: "P.KvBatch") -> None:
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
                self.fail(r.req, f"KV from {msg.prefill_worker_id}: {r.error}")
        for got in landed:
            self.handoff.stats.record(got.num_bytes)   # the prefill side times the transfer
            self.mark_kv_received(got.req, msg, got)
            logger.debug("%s: kv_batch from %s [%d]: %s kv_len=%d bytes=%d via %s", self.worker_id,
                         msg.prefill_worker_id, msg.forward_iter, got.req.rid, got.item.seq_len,
                         got.num_bytes, msg.backend)   # benchmarks/disagg_ttft.py reads it
            self.start(got.req, got.item, msg)
        self.handoff.send_to(self.peer_addr(msg.prefill_worker_id), P.KvAck(
            rids=[got.req.rid for got in landed], failed=failed, decode_worker_id=self.worker_id))
        self.flush_outputs()

    def start(self, req: Req, item: "P.KvReq", msg: "P.KvBatch") -> None:
        """Its KV landed: the first token (sampled by prefill's batch) is committed, then it decodes."""
        self.transfer_queue.pop(req.rid)
        if self.corrupt_kv:
            self.runner.kv_pool.kv[:, :, :, req.page_table[0]] += 1.0
        req.kv_len = item.seq_len
        self.fork_siblings(req)
        self.retracted.discard(req.rid)
        if req.grammar is not None:   # the prefill's matcher took it; ours is not in any forward yet
            req.grammar.accept(item.first_token)
        self.marks.sampling_iter = msg.forward_iter   # the first token: prefill's batch
        req.prompt_logprobs = item.prompt_logprobs   # streamed with the first token
        self.output.commit_token(req, item.first_token, item.first_logprob, item.first_top)
        if not req.is_finished:
            self.decode.add(req)

    def fork_siblings(self, req: Req) -> None:
        """n > 1: the siblings waiting on this request's KV start from it (before its first
        token is committed, which may finish and release it)."""
        siblings = [s for s in self.forks.pop(req.rid, []) if self.reqs.get(s.rid) is s]
        if not siblings:
            return
        try:
            copies = self.cache.fork(req, siblings, req.prompt_len - 1)
        except MemoryError as e:                   # another pair may have the room
            for s in siblings:
                self.fail(s, f"no pages to fork from {req.rid}: {e}", retriable=True)
            return
        if copies:
            self.transfer.fence.synchronize()      # the parent's imported KV is in place
            src, dst = zip(*copies)
            kv = self.runner.kv_pool.kv
            copy_pages(kv, kv, list(src), list(dst))
            if kv.is_cuda:                         # NOTE: before a forward on another stream reads them
                torch.cuda.current_stream(kv.device).synchronize()
        logger.info("request %s: %d siblings forked over %d shared pages", req.rid, len(siblings),
                    siblings[0].num_shared_pages)
        for s in siblings:
            self.decode.add(s)                     # its first step recomputes the last prompt position

    def mark_kv_received(self, req: Req, msg: "P.KvBatch", got: Landed) -> None:
        ready = self.marks.get(req.rid, "decode_ready") or {}
        self.marks.mark(req.rid, "kv_received", bytes=got.num_bytes, backend=msg.backend,
                        src=msg.prefill_worker_id, src_forward_iter=msg.forward_iter,
                        import_s=round(got.import_s, 6), prealloc_s=ready.get("prealloc_s", 0.0))
        logger.info("request %s: KV from %s batch [%d], %d bytes, imported in %.1f ms%s", req.rid,
                    msg.prefill_worker_id, msg.forward_iter, got.num_bytes, 1000 * got.import_s,
                    f" ({got.item.layers_sent} layers ahead)" if got.item.layers_sent else "")

    def peer_addr(self, prefill_worker_id: str) -> str:
        return self.prefill_addrs[prefill_worker_id]

    @property
    def own_peer(self) -> "P.Peer":
        """This worker as a prefill worker reaches it."""
        return P.Peer(self.worker_id, self.handoff.address)

    # ---- scheduling --------------------------------------------------------------
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        for req in self.transfer_queue.pop_expired():
            self.fail(req, f"no KV from {req.peer.worker_id} in time", retriable=True)
        # a retracted request is prefilled again through a `reprefill`, which sends the whole KV
        for req in self.prealloc_queue.pop_reserved(len(self.decode), self.config.max_running_requests,
                                                    no_reuse=frozenset(self.retracted)):
            self.send_ready(req)
        return self.decode.schedule_after(self.local_prefill)

    def send_ready(self, req: Req) -> None:
        addr = req.peer.data_addr
        self.prefill_addrs[req.peer.worker_id] = addr
        self.transfer_queue.add(req)
        admitted = self.marks.get(req.rid, "admitted")
        if admitted is not None:                # pages reserved: how long that took
            self.marks.note(req.rid, "decode_ready", prealloc_s=round(time.time() - admitted["t"], 6))
        if req.rid in self.retracted:
            # the prefill worker forgot it after the handoff: the original parameters and the
            # tokens so far; the pages are reserved, so this is also the readiness
            self.handoff.send_to(addr, P.Reprefill(
                rid=req.rid, input_ids=list(req.input_ids), sampling=req.sampling,
                output_ids=list(req.output_ids), decode=self.own_peer))
        else:
            self.handoff.send_to(addr, P.DecodeReady(rid=req.rid, decode=self.own_peer, held_len=req.cached_len))

    def retract(self, req: Req) -> None:
        logger.info("%s: retracting %s (%d tokens) to free pages", self.worker_id, req.rid, req.seq_len)
        if req.peer is None:
            self.local_prefill.add(req, front=True)
            return
        self.retracted.add(req.rid)
        self.prealloc_queue.add(req, front=True)

    def forget(self, req: Req) -> None:
        for sibling in self.forks.pop(req.rid, []):   # it ended before its KV landed
            if self.reqs.get(sibling.rid) is sibling:
                self.fail(sibling, f"{req.rid} ended before its KV arrived: {req.error or req.finish_reason}",
                          retriable=True)
        self.prealloc_queue.remove(req.rid)
        self.local_prefill.remove(req.rid)
        self.transfer_queue.remove(req.rid)
        self.intake.forget(req.rid)
        self.decode.remove(req)
        self.retracted.discard(req.rid)

    def decode_stats(self, batch: ScheduleBatch) -> DecodeStats:
        return DecodeStats.of_batch(
            batch, self.cache.token_usage, self.num_queue_reqs, num_prealloc_reqs=len(self.prealloc_queue),
            num_transfer_reqs=len(self.transfer_queue), num_retracted_reqs=self.decode.num_retracted_total)

    # ---- gauges ------------------------------------------------------------------
    @property
    def num_running_reqs(self) -> int:
        return len(self.decode)

    @property
    def num_queue_reqs(self) -> int:
        return len(self.prealloc_queue) + len(self.local_prefill)

    def heartbeat_gauges(self) -> WorkerGauges:
        return replace(super().heartbeat_gauges(), num_prealloc_reqs=len(self.prealloc_queue),
                       num_transfer_reqs=len(self.transfer_queue),
                       num_retracted_reqs_total=self.decode.num_retracted_total)
