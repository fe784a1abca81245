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
Decode-side prefill: a request the router sends without a prefill peer (its uncached part
is short, or the prefill side's queueing would break the TTFT target) is prefilled here in
chunks riding in the decode steps (`LocalPrefill`, local_prefill.py), extending from this
worker's prefix cache, which holds the KV of the requests it finished.
The KV itself lands through `KvReception` (kv_reception.py, shared with DLLM workers): kv_layers
as they come, kv_batch last.
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
from cluster.runtime.stats import DecodeStats, PrefillStats
from cluster.runtime.schedule_batch import Req, ScheduleBatch
from cluster.runtime.worker_scheduler import WorkerScheduler
from decode_worker.kv_reception import KvReception
from decode_worker.local_prefill import LocalPrefill
from decode_worker.prealloc_queue import PreallocQueue

logger = logging.getLogger("pdcluster.decode")

# test-only fault switch: perturb the first received page, to prove the handoff is used
CORRUPT_KV_ENV = "PDCLUSTER_TEST_CORRUPT_KV"


class DecodeScheduler(WorkerScheduler):
    role = "decode"
    supports_prefix_cache = True
    supports_deferred_reads = True

    def __init__(self, config, worker_id, runner, control, handoff: KvHandoff, timeouts,
                 tpot: Optional[float] = None):
        """`tpot`: the `[slo] tpot` target a step carrying a prefill chunk stays within."""
        super().__init__(config, worker_id, runner, control, handoff)
        self.transfer = handoff.transfer
        if runner.import_fence is not self.transfer.fence:   # forwards must wait for the KV imports
            raise ValueError(f"{worker_id}: the model runner's import fence is not the KV transfer's")
        self.prealloc_queue = PreallocQueue(self.cache)
        self.reception = KvReception(worker_id, handoff, self.marks, timeouts, self.cache.page_size)
        self.transfer_queue = self.reception.transfer_queue
        # a lone request short of pages waits for those reserved by KV on its way when its KV
        # comes from a prefill worker (the prealloc queue holds no pages); a local prefill would
        # queue behind the prompts mid-prefill that hold them
        self.decode = DecodeManager(self.cache, on_retract=self.retract, on_fail=self.fail,
                                    can_wait_alone=lambda req: req.peer is not None)
        self.local_prefill = LocalPrefill(self.cache, config, tpot)
        self.retracted: set[str] = set()      # rids that must be prefilled again
        self.forks: dict[str, list[Req]] = {}   # rid -> its siblings (n > 1), until its KV lands
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
            self.local_prefill.queue.add(req)       # no prefill peer: prefill it here
            return
        self.marks.note(req.rid, "admitted", t=time.time())
        self.prealloc_queue.add(req)

    def recv_data(self) -> None:
        self.reception.receive(self.start, self.fail)
        self.flush_outputs()

    def start(self, req: Req, item: "P.KvReq", msg: "P.KvBatch") -> None:
        """Its KV landed: the first token (sampled by prefill's batch) is committed, then it decodes."""
        if item.first_token is None:               # KV prefilled for a DLLM worker
            self.fail(req, f"KV from {msg.prefill_worker_id} came without a first token")
            return
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
            if self.runner.followers is not None:   # the other TP ranks copy their heads' pages too
                self.runner.followers.send_page_copy(list(src), list(dst))
            if kv.is_cuda:                         # NOTE: before a forward on another stream reads them
                torch.cuda.current_stream(kv.device).synchronize()
        logger.info("request %s: %d siblings forked over %d shared pages", req.rid, len(siblings),
                    siblings[0].num_shared_pages)
        for s in siblings:
            self.decode.add(s)                     # its first step recomputes the last prompt position

    # ---- scheduling --------------------------------------------------------------
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        for req in self.reception.pop_expired():
            self.fail(req, f"no KV from {req.peer.worker_id} in time", retriable=True)
        # a retracted request is prefilled again through a `reprefill`, which sends the whole KV
        for req in self.prealloc_queue.pop_reserved(len(self.decode), self.config.max_running_requests,
                                                    no_reuse=frozenset(self.retracted)):
            self.send_ready(req)
        return self.decode.schedule_mixed(self.local_prefill.queue, self.local_prefill.chunk_tokens)

    def send_ready(self, req: Req) -> None:
        addr = self.reception.expect(req)
        admitted = self.marks.get(req.rid, "admitted")
        if admitted is not None:                # pages reserved: how long that took
            self.marks.note(req.rid, "decode_ready", prealloc_s=round(time.time() - admitted["t"], 6))
        if req.rid in self.retracted:
            # the prefill worker forgot it after the handoff: the original parameters and the
            # tokens so far; the pages are reserved, so this is also the readiness
            self.handoff.send_to(addr, P.Reprefill(
                rid=req.rid, input_ids=list(req.input_ids), sampling=req.sampling,
                output_ids=list(req.output_ids), decode=self.reception.own_peer))
        else:
            self.handoff.send_to(addr, P.DecodeReady(rid=req.rid, decode=self.reception.own_peer, held_len=req.cached_len))

    def retract(self, req: Req) -> None:
        logger.info("%s: retracting %s (%d tokens) to free pages", self.worker_id, req.rid, req.seq_len)
        if req.peer is None:
            self.local_prefill.queue.add(req, front=True)
            return
        self.retracted.add(req.rid)
        self.prealloc_queue.add(req, front=True)

    def forget(self, req: Req) -> None:
        for sibling in self.forks.pop(req.rid, []):   # it ended before its KV landed
            if self.reqs.get(sibling.rid) is sibling:
                self.fail(sibling, f"{req.rid} ended before its KV arrived: {req.error or req.finish_reason}",
                          retriable=True)
        self.prealloc_queue.remove(req.rid)
        self.local_prefill.queue.remove(req.rid)
        self.reception.forget(req.rid)
        self.decode.remove(req)
        self.retracted.discard(req.rid)

    def process_batch_result(self, batch: ScheduleBatch, result) -> None:
        self.local_prefill.observe(batch, result)
        if batch.mix is None:
            return super().process_batch_result(batch, result)
        # a mixed step: its prompt chunk reports as a prefill batch, its rows as a decode step
        self.output.commit(batch, result)
        rows = batch.mix.num_decode_rows
        self.report_prefill_stats(batch, PrefillStats(
            sum(batch.is_last_chunk[rows:]), batch.num_prefill_tokens, batch.cached_len,
            token_usage=self.cache.token_usage, num_running_reqs=rows, num_queue_reqs=self.num_queue_reqs))
        self.report_decode_stats(batch, replace(self.decode_stats(batch), num_running_reqs=rows,
                                                num_tokens=sum(batch.prefix_lens[:rows]) + rows))
        self.flush_outputs()

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
        return len(self.prealloc_queue) + len(self.local_prefill.queue)

    def heartbeat_gauges(self) -> WorkerGauges:
        return replace(super().heartbeat_gauges(), num_prealloc_reqs=len(self.prealloc_queue),
                       num_transfer_reqs=len(self.transfer_queue),
                       num_retracted_reqs_total=self.decode.num_retracted_total, **self.local_prefill.gauges(len(self.decode)))
