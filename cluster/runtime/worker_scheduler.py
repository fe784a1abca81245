"""WorkerScheduler: what every serving role shares on top of the Scheduler loops.

Intake of `generate` / `abort` from the router, per-request resources (pages, future
slot), token streaming back to the router (its TokenOutbox, token_outbox.py), failing a
request with a reason, and the heartbeat gauges.
A disaggregated role (prefill, decode) passes its `KvHandoff` in: the worker then also
wakes on its data plane, reports its transfer gauges and closes it.
"""
from __future__ import annotations

import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from cluster.wire import protocol as P
from cluster.wire.gauges import WorkerGauges
from cluster.runtime.batch_builder import build_forward_input
from cluster.runtime.cache_manager import CacheManager, SlotAllocator
from cluster.runtime.forward_executor import defer_reads
from cluster.runtime.output_processor import OutputProcessor
from cluster.runtime.prefix_sharing import cache_prefilled
from cluster.runtime.stats import DecodeStats, PrefillStats
from cluster.runtime.request_marks import MarkBook
from cluster.runtime.token_outbox import TokenOutbox
from cluster.config import SchedulerConfig
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
from cluster.runtime.base_scheduler import Scheduler

if TYPE_CHECKING:
    from cluster.runtime.kv_handoff import KvHandoff

logger = logging.getLogger("pdcluster.worker")

IDLE_WAIT_S = 0.005   # how long an idle pass blocks waiting for the next message
RANK_DEATH_WAIT_S = 1.0   # after a failed batch of a worker of several ranks: did one of them die?


class ControlPlane(Protocol):
    """What a worker needs of its router connection (`wire.transport.ControlClient`)."""
    arrivals: Optional[threading.Event]     # set on every arrival here and on the data plane; None: poll
    rejected_frames: dict[str, int]
    num_protocol_errors: int

    def send(self, msg) -> None: ...

    def recv(self, timeout: Optional[float] = None): ...


class WorkerScheduler(Scheduler):
    supports_prefix_cache = False   # roles whose requests extend from a shared prefix
    supports_deferred_reads = False   # roles whose results are read only when processed (forward_executor.py)

    def __init__(self, config: SchedulerConfig, worker_id: str, runner, control: ControlPlane,
                 handoff: Optional["KvHandoff"] = None, on_launch: Optional[Callable[[int], None]] = None,
                 forward_fn: Optional[Callable] = None):
        """`forward_fn`: what runs a launched batch's forward input (default `runner.forward`, its reads
        deferred where the role supports it on CUDA under overlap, with one rank: `defers_reads`)."""
        on_cuda = str(runner.device).startswith("cuda")
        self.defers_reads = (forward_fn is None and self.supports_deferred_reads and runner.followers is None
                             and defer_reads(on_cuda, config.overlap))
        if forward_fn is None:
            forward_fn = partial(runner.forward, wait=False) if self.defers_reads else runner.forward
        super().__init__(config, worker_id, forward_fn, on_cuda=on_cuda, on_launch=on_launch,
                         cpu_threads=None if on_cuda else runner.num_threads)
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.cache = CacheManager(runner.page_allocator, runner.page_size)
        self.slots = SlotAllocator(runner.future_map.numel())
        self.control = control
        self.handoff = handoff
        self.reqs: dict[str, Req] = {}          # live requests by rid
        self.marks = MarkBook(worker_id)    # per-request moments for the router's traces
        self.outbox = TokenOutbox(worker_id, control, self.marks)
        self.output = OutputProcessor(self.tokenizer, self.outbox.emit, self.release, self.outbox.emit_plain)
        self._idle = False
        self.switch_to: Optional[str] = None     # a role switch: no new work, stop once drained
        self._grammar_backend = None
        # one wake-up for every plane this worker reads, given to each plane at its construction:
        # an idle pass sleeps until any of them has a message (a kv_batch or decode_ready must
        # not wait out a control-plane timeout)
        self.arrivals = control.arrivals
        if handoff is not None and handoff.data_plane.arrivals is not self.arrivals:
            raise ValueError(f"{worker_id}: the data plane must wake the worker as its control plane does")

    # ---- intake --------------------------------------------------------------
    def enable_prefix_cache(self, host_tier_gb: float = 0) -> None:
        """The radix prefix cache, with a host tier of `host_tier_gb` GB when > 0."""
        if self.supports_prefix_cache and self.cache.tree is None:
            from cluster.engine.host_tier import attach_host_tier
            tier = attach_host_tier(self.executor, self.runner, host_tier_gb) if host_tier_gb > 0 else None
            self.cache.enable_prefix_cache(tier)

    def recv_requests(self) -> None:
        timeout = IDLE_WAIT_S if self._idle else 0.0
        self._idle = False
        if timeout and self.arrivals is not None:
            self.arrivals.wait(timeout)
            self.arrivals.clear()                # NOTE: before draining: a later arrival sets it again
            timeout = 0.0
        while True:
            got = self.control.recv(timeout=timeout)
            if got is None:
                break
            timeout = 0.0
            self.handle_control(got)
        self.recv_data()

    def recv_data(self) -> None:
        """Data-plane messages (disaggregated roles override)."""

    def on_idle(self) -> None:
        self._idle = True
        if self.switch_to is not None and not self.reqs:
            logger.info("%s: drained for the switch to %s", self.worker_id, self.switch_to)
            self.stop()

    def handle_control(self, msg) -> None:
        if isinstance(msg, P.Generate):
            req = self.accept(msg.rid, msg.input_ids, msg.sampling, msg.output_ids, msg.peer)
            if req is not None:
                self.admit(req, msg)
        elif isinstance(msg, P.Abort):
            req = self.reqs.get(msg.rid)
            if req is not None:
                req.finish_reason, req.error = "abort", msg.reason
                self.release(req)
        elif isinstance(msg, P.RoleSwitch):
            # NOTE: the router placed nothing here after sending it; what came before drains
            logger.info("%s: role switch to %s requested; draining %d request(s)", self.worker_id,
                        msg.role, len(self.reqs))
            self.switch_to = msg.role
        elif isinstance(msg, P.Shutdown):
            logger.info("%s: shutdown requested by the router (%s)", self.worker_id, msg.reason)
            self.stop()
        else:
            logger.warning("%s: unexpected control message %s", self.worker_id, type(msg).__name__)

    def accept(self, rid: str, input_ids: list, sampling: SamplingParams, output_ids: list,
               peer: Optional[P.Peer]) -> Optional[Req]:
        """A new live request (from `generate`, or `reprefill` on prefill), or None once the
        router was told why not. `sampling` is always the request's original: max_tokens and
        min_tokens count `output_ids` (tokens generated before a resume or a retraction) too."""
        vocab = self.runner.config.vocab_size
        if rid in self.reqs:
            reason = "duplicate request id"
        elif any(t >= vocab for t in input_ids) or any(t >= vocab for t in output_ids) \
                or any(t >= vocab for t in sampling.stop_token_ids) \
                or any(t >= vocab for t, _ in sampling.logit_bias):
            # NOTE: checked again here: any process on the network can send a generate
            reason = f"rejected: token id out of range [0, {vocab})"
        elif sampling.top_k > vocab:
            reason = f"rejected: top_k {sampling.top_k} exceeds the vocabulary ({vocab})"
        elif not self.slots.num_free:
            reason = "rejected: out of future-token slots"
        else:
            req = Req(rid, input_ids, sampling, eos_token_ids=self.tokenizer.eos_token_ids,
                      output_ids=output_ids)
            reason = self.attach_grammar(req)
            if reason is None:
                req.peer, req.future_slot = peer, self.slots.allocate()
                self.reqs[rid] = req
                return req
        self.control.send(P.Error(rid=rid, reason=reason, worker_id=self.worker_id))
        return None

    def attach_grammar(self, req: Req) -> Optional[str]:
        """The request's matcher, having taken its output ids so far; the reason when it cannot be built.
        NOTE: here, before any forward holds the request; afterwards only forwards advance it."""
        sp = req.sampling
        if not sp.grammar_kind:
            return None
        from cluster.engine.grammar import GrammarBackend, GrammarError
        try:
            if self._grammar_backend is None:   # built on the first constrained request (imports xgrammar)
                self._grammar_backend = GrammarBackend(self.tokenizer, self.runner.config.vocab_size)
            req.grammar = self._grammar_backend.matcher(sp.grammar_kind, sp.grammar_spec, accepted=req.output_ids,
                                                        stop_token_ids=set(req.eos_token_ids) | set(sp.stop_token_ids))
        except GrammarError as e:
            return f"rejected: {e}"
        return None

    def admit(self, req: Req, msg) -> None:
        raise NotImplementedError

    # ---- output ----------------------------------------------------------------
    def flush_outputs(self) -> None:
        self.outbox.flush()

    def fail(self, req: Req, reason: str, retriable: bool = False) -> None:
        """`retriable`: a timeout waiting on a peer, which another pair may not hit; a
        deterministic failure (bad batch, rejected input) is never retried elsewhere."""
        logger.warning("%s: request %s failed: %s", self.worker_id, req.rid, reason)
        req.finish_reason, req.error = "abort", reason
        self.control.send(P.Error(rid=req.rid, reason=reason, worker_id=self.worker_id,
                                  retriable=retriable))
        self.release(req)

    def fail_batch(self, batch: ScheduleBatch, reason: str) -> None:
        if self.runner.followers is not None:      # a collective fails at once when a rank dies
            self.runner.followers.exit_if_rank_died(wait_s=RANK_DEATH_WAIT_S)
        for req in batch.reqs:
            if self.reqs.get(req.rid) is req:      # not finished or failed already
                self.fail(req, reason)
        self.flush_outputs()                       # tokens processed before the failure

    def release(self, req: Req) -> None:
        """Free everything a finished, aborted or failed request holds; a finished request's
        KV stays in the prefix cache (an aborted or failed one's may never have been written)."""
        self.cache.release(req, keep_kv=req.error is None and req.finish_reason != "abort")
        self.forget(req)
        self.marks.on_release(req)
        if self.reqs.pop(req.rid, None) is not None:
            # NOTE: a forward already launched may still write this slot; forwards run in
            # launch order, so a new owner's prefill writes it before its decode reads it.
            self.slots.free(req.future_slot)
            req.future_slot = -1

    def forget(self, req: Req) -> None:
        """Drop the request from the role's queues."""
        raise NotImplementedError

    def process_batch_result(self, batch: ScheduleBatch, result) -> None:
        """Workers that prefill and decode (unified; decode with a local prefill); prefill and
        DLLM workers override it."""
        if batch.mode == ForwardMode.EXTEND:
            self.process_batch_result_prefill(batch, result)
        else:
            self.process_batch_result_decode(batch, result)

    def process_batch_result_prefill(self, batch: ScheduleBatch, result) -> None:
        """A prefill whose first tokens go out from this worker."""
        self.output.commit(batch, result)
        self.report_prefill_stats(batch, PrefillStats.of_batch(
            batch, self.cache.token_usage, self.num_running_reqs, self.num_queue_reqs))
        self.flush_outputs()

    def process_batch_result_decode(self, batch: ScheduleBatch, result) -> None:
        """A decode batch of the unified or decode worker: commit its tokens, report it under
        the iteration that launched it, stream."""
        self.output.commit(batch, result)
        self.report_decode_stats(batch, self.decode_stats(batch))
        self.flush_outputs()

    def decode_stats(self, batch: ScheduleBatch) -> DecodeStats:
        return DecodeStats.of_batch(batch, self.cache.token_usage, self.num_queue_reqs)

    # ---- forward -----------------------------------------------------------------
    def run_batch(self, batch: ScheduleBatch):
        self.cache.seal_loads(self.forward_ct + 1)   # host-tier loads so far run before this forward
        future = super().run_batch(batch)       # forward_iter is set there, first
        self.marks.on_launch(batch)
        return future

    def on_result(self, batch: ScheduleBatch) -> None:
        if batch.mode == ForwardMode.EXTEND:   # NOTE: before its tokens commit (a finish releases)
            cache_prefilled(self.cache, batch)   # its prompt pages are written: others may share them now
        self.marks.on_processing(batch)

    def build_forward_input(self, batch: ScheduleBatch):
        return build_forward_input(batch)

    # ---- gauges ------------------------------------------------------------------
    @property
    def num_running_reqs(self) -> int:
        return 0

    @property
    def num_queue_reqs(self) -> int:
        return 0

    def heartbeat_gauges(self) -> WorkerGauges:
        """The gauges this role owns, read live (roles add their queues')."""
        return WorkerGauges(**self.stats.gauges(), num_running_reqs=self.num_running_reqs,
                            num_queue_reqs=self.num_queue_reqs, token_usage=self.cache.token_usage,
                            prefix_cache_hit_rate=self.cache.hit_rate,
                            **self.cache.tier_gauges(),
                            prefix_cache_query_tokens_total=self.cache.num_query_tokens,
                            protocol_errors_total=self.num_protocol_errors(),
                            rejected_frames_total=self.rejected_frames(),
                            **(self.handoff.gauges() if self.handoff is not None else {}))

    def rejected_frames(self) -> dict[str, int]:
        """Refused handshakes and frames of this worker's sockets, by reason."""
        out = dict(self.control.rejected_frames)
        if self.handoff is not None:
            for reason, n in self.handoff.rejected_frames.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def num_protocol_errors(self) -> int:
        errors = self.control.num_protocol_errors
        return errors + (self.handoff.num_protocol_errors if self.handoff is not None else 0)

    def close(self) -> None:
        """Release role resources (the KV handoff) after the loop ends."""
        if self.handoff is not None:
            self.handoff.close()


def start_heartbeat(scheduler: WorkerScheduler, control, interval: float) -> threading.Thread:
    """Gauges go to the router every `interval` seconds, from their own thread."""
    def beat() -> None:
        while scheduler.is_running:
            try:
                control.send(P.Heartbeat(worker_id=scheduler.worker_id, forward_ct=scheduler.forward_ct,
                                         gauges=scheduler.heartbeat_gauges()))
            except Exception:   # never let a gauge kill the worker
                logger.exception("heartbeat failed")
            time.sleep(interval)
    t = threading.Thread(target=beat, name="heartbeat", daemon=True)
    t.start()
    return t
