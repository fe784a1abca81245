"""PrefillScheduler: bootstrap queue -> prefill batch -> KV sent to decode -> inflight queue.

A request decode retracted comes back as `reprefill` (its original sampling parameters and
the tokens so far, pages already reserved on decode): it skips the bootstrap queue.
A DLLM worker may take the decode side (its `decode_ready` names `dllm_attn_block`): the
prompt's KV is then computed with the DLLM model's visibility (block-causal chunks of whole
blocks, or causal) and no first token is sampled, since the DLLM worker makes the first
block itself: with block size 1 its greedy first token is the autoregressive one anyway,
and with larger blocks or sampling an autoregressive draw would not be what it commits.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import replace
from typing import Optional

from cluster.kv_transfer import MAX_KV_ATTEMPTS
from cluster.kv_transfer.layerwise import LayerStream, Planned
from cluster.wire import protocol as P
from cluster.wire.gauges import WorkerGauges
from cluster.runtime.kv_handoff import KvHandoff
from cluster.runtime.stats import PrefillStats
from cluster.runtime.output_processor import SampledToken, sampled_tokens
from cluster.runtime.prefill_manager import PrefillManager
from cluster.runtime.schedule_batch import Req, ScheduleBatch
from cluster.runtime.step_cost import RateWindow
from cluster.runtime.worker_scheduler import WorkerScheduler
from prefill_worker.bootstrap_queue import BootstrapQueue
from prefill_worker.inflight_queue import InflightQueue

logger = logging.getLogger("pdcluster.prefill")


class PrefillScheduler(WorkerScheduler):
    role = "prefill"
    supports_prefix_cache = True

    def __init__(self, config, worker_id, runner, control, handoff: KvHandoff, timeouts):
        # NOTE: before the base, whose forward executor announces each launch to it
        layers = None
        if handoff.transfer.layerwise:
            layers = LayerStream(runner.config.num_layers, runner.kv_pool.device, worker_id, handoff.send_to)
            runner.add_layer_listener(layers.on_layer)
        super().__init__(config, worker_id, runner, control, handoff,
                         on_launch=layers.launching if layers is not None else None)
        self.transfer, self.layers = handoff.transfer, layers
        self.prefill = PrefillManager(self.cache, config.max_prefill_tokens, config.max_running_requests)
        self.bootstrap_queue = BootstrapQueue(timeouts.decode_ready)
        self.inflight_queue = InflightQueue(timeouts.kv_transfer)
        self.held_by_decode: dict[str, int] = {}   # rid -> leading tokens decode holds (not sent)
        self.dllm_blocks: dict[str, int] = {}      # rid -> dllm_attn_block its DLLM worker asked for
        self.rate = RateWindow()                   # prefill_throughput, for the router's queueing prediction
        self.launched_tokens: dict[int, int] = {}  # forward_iter -> tokens of a forward not processed yet
        self.peer_tp: dict[str, int] = {}          # decode data address -> its TP size (from its readiness)
        if layers is not None:
            logger.info("%s: layer-wise KV streaming %s", worker_id,
                        "on" if self.transfer.layerwise is True else "for peers reached through zmq (auto)")

    # ---- intake ----------------------------------------------------------------
    def admit(self, req: Req, msg) -> None:
        if req.peer is None:
            self.fail(req, "prefill worker got a request without a decode peer")
            return
        ready = self.bootstrap_queue.add(req)
        if ready is not None:
            self.start_prefill(ready)

    def recv_data(self) -> None:
        for sender, msg in self.handoff.received():
            if isinstance(msg, (P.DecodeReady, P.Reprefill)):
                self.peer_tp[msg.decode.data_addr] = msg.decode.tp
            if isinstance(msg, P.DecodeReady):
                if msg.held_len:
                    self.held_by_decode[msg.rid] = msg.held_len
                if msg.dllm_attn_block:
                    self.dllm_blocks[msg.rid] = msg.dllm_attn_block
                req = self.bootstrap_queue.mark_ready(msg.rid, msg.decode)
                if req is not None:
                    self.start_prefill(req)
            elif isinstance(msg, P.KvAck):
                self.handle_ack(msg)
            elif isinstance(msg, P.Reprefill):
                # decode retracted the request and has its pages reserved again: prefill the
                # prompt plus the tokens so far at once (no bootstrap wait)
                req = self.accept(msg.rid, msg.input_ids, msg.sampling, msg.output_ids, msg.decode)
                if req is not None:
                    self.prefill.add(req)
            else:
                logger.warning("%s: unexpected data-plane message %s from %s",
                               self.worker_id, type(msg).__name__, sender)

    def start_prefill(self, req: Req) -> None:
        """Its decode side is ready: prefill it, with the visibility a DLLM worker asked for."""
        req.dllm_attn_block = self.dllm_blocks.pop(req.rid, 0)
        self.prefill.add(req)

    def is_peer_of(self, rid: str, decode_worker_id: str) -> bool:
        """Acks count only from the decode worker the router paired the request with."""
        req = self.reqs.get(rid)
        if req is not None and (req.peer is None or req.peer.worker_id != decode_worker_id):
            self.handoff.count_rejected("wrong_peer")
            return False
        return True

    def handle_ack(self, msg: "P.KvAck") -> None:
        for rid in msg.rids:
            if not self.is_peer_of(rid, msg.decode_worker_id):
                continue
            acked = self.inflight_queue.ack(rid)
            if acked is not None:
                req, seconds, num_bytes = acked
                self.handoff.stats.record(num_bytes, seconds)
                req.finish_reason = "handed_off"
                self.release(req)
        for failed in msg.failed:
            if not self.is_peer_of(failed.rid, msg.decode_worker_id):
                continue
            acked = self.inflight_queue.ack(failed.rid)
            if acked is None:
                continue
            req = acked[0]
            attempt = req.kv_attempt + 1
            if failed.reason is P.KvFailure.CHECKSUM and attempt < MAX_KV_ATTEMPTS:
                self.prefill_again(req, attempt, str(failed))
            else:
                self.fail(req, f"decode worker {msg.decode_worker_id} rejected the KV: {failed}")

    def prefill_again(self, req: Req, attempt: int, reason: str) -> None:
        """The KV did not arrive intact: prefill it again (seeded sampling draws per token index,
        so the first token is the same); decode keeps its pages reserved for the new attempt."""
        logger.warning("%s: %s KV attempt %d failed (%s); prefilling it again", self.worker_id,
                       req.rid, attempt - 1, reason)
        self.cache.free(req)
        req.kv_len = 0
        req.kv_attempt = attempt
        self.prefill.add(req, front=True)

    def forget(self, req: Req) -> None:
        self.prefill.remove(req.rid)
        self.bootstrap_queue.remove(req.rid)
        self.inflight_queue.remove(req.rid)
        self.held_by_decode.pop(req.rid, None)
        self.dllm_blocks.pop(req.rid, None)
        if self.layers is not None:
            self.layers.forget(req.rid)

    # ---- scheduling --------------------------------------------------------------
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        for req in self.bootstrap_queue.pop_expired():
            self.fail(req, f"no decode_ready within {self.bootstrap_queue.timeout_s:g}s",
                      retriable=True)
        for req in self.inflight_queue.pop_expired():
            self.handoff.stats.count_failure(P.KvFailure.TIMEOUT)
            # a peer silent this long is gone: release the KV frames still queued for it
            self.handoff.drop_peer(req.peer.data_addr)
            self.fail(req, f"no kv_ack from {req.peer.worker_id} within "
                      f"{self.inflight_queue.timeout_s:g}s", retriable=True)
        return self.prefill.schedule(num_running=0)

    def build_forward_input(self, batch: ScheduleBatch):
        fi = dllm_prompt_input(batch, super().build_forward_input(batch))
        if self.layers is not None:      # NOTE: after the build (which may fail), one plan per forward
            planned = [self.planned(req, p + e) for req, p, e, last in zip(
                batch.reqs, batch.prefix_lens, batch.extend_lens, batch.is_last_chunk) if last]
            self.layers.plan(batch.forward_iter, [p for p in planned if self.transfer.streams_layers(p.backend)])
        return fi

    def planned(self, req: Req, kv_len: int) -> Planned:
        """Where a request this forward completes streams its layers, and what its KV is."""
        backend = self.sender_for(req.peer.data_addr)
        pages, length = self.kv_span(req, kv_len)
        num = self.runner.kv_pool.pages_for(length)
        span = P.KvSpan(req.rid, kv_len, attempt=req.kv_attempt, held_len=self.held_of(req, kv_len),
                        src_pages=list(pages[:num]) if backend.holds_pages else None, **self.tp_layout)
        return Planned(backend, pages, length, req.peer.data_addr, span)

    def sender_for(self, addr: str):
        return self.transfer.sender_for(addr, self.peer_tp.get(addr, 1))

    @property
    def tp_layout(self) -> dict:
        """What every KV item says of this worker's TP layout: its ranks and the KV heads each holds."""
        return {"tp": self.runner.tp.size, "heads_per_rank": self.runner.kv_pool.num_kv_heads}

    def kv_span(self, req: Req, kv_len: int) -> tuple[list[int], int]:
        """(pages, length) of the KV that travels: the whole pages decode already holds do not."""
        held = self.held_of(req, kv_len)
        return req.page_table[held // self.cache.page_size:], kv_len - held

    def held_of(self, req: Req, kv_len: int) -> int:
        return min(self.held_by_decode.get(req.rid, 0), (kv_len - 1) // self.cache.page_size * self.cache.page_size)

    def run_batch(self, batch: ScheduleBatch):
        future = super().run_batch(batch)
        self.launched_tokens[batch.forward_iter] = batch.num_tokens
        return future

    def process_batch_result(self, batch: ScheduleBatch, result) -> None:
        self.launched_tokens.pop(batch.forward_iter, None)
        self.rate.observe(batch.num_tokens, result.timings.get("step_s", 0.0))
        self.process_batch_result_disagg_prefill(batch, result)

    def fail_batch(self, batch: ScheduleBatch, reason: str) -> None:
        self.launched_tokens.pop(batch.forward_iter, None)
        super().fail_batch(batch, reason)

    def process_batch_result_disagg_prefill(self, batch: ScheduleBatch, result) -> None:
        """Ship each finished prompt's KV and first token: one kv_batch per decode worker."""
        by_dest: dict[str, list[SampledToken]] = defaultdict(list)
        for sampled in sampled_tokens(batch, result):
            by_dest[sampled.req.peer.data_addr].append(sampled)
        forward_s = result.timings.get("model_s", 0.0)
        for addr, items in by_dest.items():
            self.send_kv(batch, addr, items, forward_s)
        self.report_prefill_stats(batch, PrefillStats.of_batch(
            batch, self.cache.token_usage, num_running_reqs=0, num_queue_reqs=len(self.prefill),
            num_bootstrap_reqs=len(self.bootstrap_queue), num_inflight_reqs=len(self.inflight_queue)))

    def send_kv(self, batch: ScheduleBatch, addr: str, items, forward_s: float) -> None:
        """One kv_batch to the decode worker at `addr`; the backend moves the bytes."""
        backend = self.sender_for(addr)
        faults = self.transfer.faults
        reqs, tensors, packed_all = [], [], []
        for req, token, lp, top in items:
            t0 = time.perf_counter()
            # decode-side reuse: the whole pages decode already holds do not travel
            held = self.held_of(req, req.kv_len)
            staged = self.layers.finish(req.rid) if self.layers is not None else None
            packed = staged[0] if staged is not None else backend.pack(*self.kv_span(req, req.kv_len))
            fault = faults.draw() if faults is not None else None
            if fault == "corrupt":
                backend.corrupt(packed)
            logger.debug("%s: kv_batch to %s [%d]: %s kv_len=%d forward_s=%.3f pack_s=%.3f via %s%s",
                         self.worker_id, req.peer.worker_id, batch.forward_iter, req.rid, req.kv_len,
                         forward_s, time.perf_counter() - t0, backend.name, f" ({fault})" if fault else "")
            # the transfer started with the first layer that left (layer-wise), else now
            self.inflight_queue.add(req, packed.num_bytes, sent_at=staged[1][0] if staged and staged[1] else None)
            self.marks.mark(req.rid, "prefill_done", forward_iter=batch.forward_iter,
                            num_tokens=req.kv_len, to=req.peer.worker_id)
            logger.info("request %s: prefilled in batch [%d], %d tokens, KV (%d bytes) to %s via %s",
                        req.rid, batch.forward_iter, req.kv_len, packed.num_bytes,
                        req.peer.worker_id, backend.name)
            if not backend.holds_pages:
                self.cache.release(req)                 # the packed copy travels; the pages stay cached
            if fault == "drop":
                continue                                # lost on the way: kv_ack never comes
            if req.dllm_attn_block:                   # a DLLM worker makes its own first block
                token = lp = top = None
            reqs.append(P.KvReq(req.rid, token, req.kv_len, lp, top, prompt_logprobs=req.prompt_logprobs,
                                attempt=req.kv_attempt,
                                checksum=packed.checksum, src_pages=packed.src_pages, held_len=held,
                                layers_sent=packed.layers_sent, **self.tp_layout))
            if packed.tensor is not None and backend.name == "zmq":
                tensors.append(packed.tensor)
            packed_all.append(packed)
        self.marks.flush(self.control)                  # NOTE: the router hears it before decode
        if not reqs:
            return
        self.handoff.send_to(addr, P.KvBatch(forward_iter=batch.forward_iter, prefill_worker_id=self.worker_id,
                                             reqs=reqs, tensors=tensors, backend=backend.name,
                                             source=backend.source()))
        backend.after_send(addr, packed_all)

    # ---- gauges ------------------------------------------------------------------
    @property
    def num_queue_reqs(self) -> int:
        return len(self.prefill) + len(self.bootstrap_queue)

    @property
    def num_queue_tokens(self) -> int:
        """Prompt tokens still to prefill: waiting for decode_ready or a batch, or in a forward."""
        waiting = sum(req.seq_len for req, _ in list(self.bootstrap_queue.waiting.entries.values()))
        return waiting + self.prefill.num_tokens + sum(list(self.launched_tokens.values()))

    def heartbeat_gauges(self) -> WorkerGauges:
        return replace(super().heartbeat_gauges(), num_bootstrap_reqs=len(self.bootstrap_queue),
                       num_queue_tokens=self.num_queue_tokens, prefill_throughput=self.rate.rate,
                       num_inflight_reqs=len(self.inflight_queue),
                       kv_transfer_seconds=self.handoff.stats.seconds.sample())

    def close(self) -> None:
        super().close()
        if self.layers is not None:
            self.layers.close()



def dllm_prompt_input(batch: ScheduleBatch, fi):
    """A batch's forward input, its DLLM prompts computed as their DLLM worker asked: no first
    token sampled, KV block-causal where the block size exceeds 1 (the engine's attn_block_sizes)."""
    blocks = [req.dllm_attn_block for req in batch.reqs]
    if not any(blocks):
        return fi
    for i, block in enumerate(blocks):
        if block:
            fi.sample[i], fi.generators[i] = False, None
            if fi.future_slots:
                fi.future_slots[i] = -1
    if any(b > 1 for b in blocks):
        fi.attn_block_sizes = [max(1, b) for b in blocks]
    return fi
