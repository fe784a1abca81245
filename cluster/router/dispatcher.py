"""The router's control loop: worker registry, dispatch, token fan-in, failure handling.

One thread owns the ControlServer's receive side and, under `self.lock`, all request and
worker state; HTTP coroutines enter only through `submit`, `abort`, `worker_exited` and the
read-only snapshots, each taking the lock briefly. Events reach a request's coroutine
through its thread-safe `sink`, so the loop never blocks on a client.

Failure rules (shared/DESIGN.md, issue 4):
- a worker is gone when the launcher says so (`worker_exited`), when it is silent for
  `timeouts.heartbeat_dead_after`, or when it registers again under the same id;
- a request with no token yet is re-dispatched to another worker / pair;
- a request with tokens already sent resumes when `recovery.resume_on_decode_failure`
  (`generate` with the prompt, the tokens sent so far and the original sampling
  parameters, whose max_tokens / min_tokens count those tokens too), else fails;
- the surviving side of a pair gets `abort` for the attempt; tokens of an old attempt are
  ignored (every attempt has its own wire rid);
- a request without progress for `timeouts.request` fails with a timeout.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from cluster.wire import protocol
from cluster.config import ClusterConfig
from cluster.router.errors import overloaded
from cluster.router.mailbox import deliver_all
from cluster.router.request_state import FailedEvent, Placement, RequestState, TokensEvent
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
from cluster.wire.gauges import WorkerGauges

log = logging.getLogger("pdcluster.router")
MAX_ATTEMPTS = 4
TICK_S = 0.05
STALL_S = 0.5                   # a longer gap between liveness checks means this process stalled


class Dispatcher:
    def __init__(self, cfg: ClusterConfig, control_endpoint: Optional[str] = None):
        self.cfg = cfg
        self.control_endpoint = control_endpoint or cfg.router.control
        self.lock = threading.RLock()
        self.directory = WorkerDirectory(cfg.router.policy)
        self.requests: dict[str, RequestState] = {}       # wire rid -> state
        self.num_restarts: dict[str, tuple[str, int]] = {}  # worker id -> (role, registrations - 1)
        self.server = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    # lifecycle
    def start(self) -> str:
        from cluster.wire.curve import endpoint_host, keys_for
        from cluster.wire.transport import ControlServer
        curve = keys_for(self.cfg.security, [endpoint_host(self.control_endpoint)])
        self.server = ControlServer(self.control_endpoint, curve=curve)
        self.control_endpoint = self.server.endpoint
        self._thread = threading.Thread(target=self._loop, name="router-control", daemon=True)
        self._thread.start()
        log.info("control endpoint %s", self.control_endpoint)
        return self.control_endpoint

    def fail_all(self, reason: str) -> None:
        with self.lock:
            for st in list(self.requests.values()):
                self._drop(st, abort_on=st.workers, reason=reason)
                st.sink(FailedEvent(503, reason, "service_unavailable"))

    def shutdown_workers(self, reason: str) -> None:
        """End of a drain: workers started by hand stop too (the launcher's would be
        stopped by it anyway)."""
        with self.lock:
            for wid in list(self.directory.workers):
                self._send(wid, protocol.Shutdown(reason=reason))

    def close(self, reason: str = "router shutting down") -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.server is not None:
            self.fail_all(reason)
            self.server.close()

    # entry points from the HTTP side
    def submit(self, st: RequestState) -> None:
        with self.lock:
            if self.num_in_flight >= self.cfg.router.max_queued_requests:
                raise overloaded(f"{self.num_in_flight} requests in flight "
                                 f"(router.max_queued_requests = "
                                 f"{self.cfg.router.max_queued_requests}); retry later")
            if not self._pick(st):
                raise overloaded(f"no live worker serves model {st.model!r}", retry_after=2)
            self._send_generate(st)

    def submit_group(self, sts: list[RequestState]) -> None:
        """n > 1 choices of one prompt (same ids and parameters but the seed): one `generate`
        to one pair, the others riding along as its `siblings`, so the prompt is prefilled
        and its KV sent once. Each choice is still its own request here (tokens, abort, retry
        and re-dispatch alone: a retried choice is re-prefilled by itself). Where forking
        does not apply (no pair, echo logprobs, a grammar), each is submitted as usual."""
        with self.lock:
            if self.num_in_flight + len(sts) > self.cfg.router.max_queued_requests:
                raise overloaded(f"{self.num_in_flight} requests in flight "
                                 f"(router.max_queued_requests = "
                                 f"{self.cfg.router.max_queued_requests}); retry later")
            first, rest = sts[0], sts[1:]
            if not self._pick(first):
                raise overloaded(f"no live worker serves model {first.model!r}", retry_after=2)
            sp = first.sampling
            if first.placement.route != "pd" or sp.prompt_logprobs or sp.grammar_kind:
                self._send_generate(first)
                for st in rest:
                    if not self._pick(st):
                        raise overloaded(f"no live worker serves model {st.model!r}", retry_after=2)
                    self._send_generate(st)
                return
            for st in rest:
                st.placement = first.placement
                self._register(st)
            self._send_generate(first, siblings=[st.wire_rid for st in rest])

    def abort(self, st: RequestState, reason: str) -> None:
        with self.lock:
            if self.requests.get(st.wire_rid) is st:
                self._drop(st, abort_on=st.workers, reason=reason)

    def worker_exited(self, worker_id: str, reason: str) -> bool:
        with self.lock:
            return self._worker_gone(worker_id, reason)

    @property
    def num_in_flight(self) -> int:
        return len(self.requests)

    # dispatch
    def _pick(self, st: RequestState) -> bool:
        d = self.directory
        st.placement = None
        if st.route == "dllm":
            w = d.pick("dllm", model=st.model)
            if w:
                st.placement = Placement.single("dllm", w.worker_id)
        elif d.count("unified") and not d.has_pair():
            w = d.pick("unified", token_ids=st.input_ids + st.output_ids, rid=st.rid)
            if w:
                st.placement = Placement.single("unified", w.worker_id)
        else:
            ids = st.input_ids + st.output_ids
            local = self._pick_local_prefill(st, ids)
            if local is not None:
                st.placement = Placement.single("local", local.worker_id)
            elif pair := d.pick_pair(token_ids=ids, rid=st.rid):
                st.placement = Placement("pd", pair[0].worker_id, pair[1].worker_id)
        return st.placement is not None

    def _pick_local_prefill(self, st: RequestState, ids: list[int]):
        """Selective disaggregation: the decode worker that already holds all but at most
        `router.local_prefill_max_tokens` of the prompt prefills the rest itself (no prefill
        worker, no KV transfer); None when no decode worker does."""
        limit = self.cfg.router.local_prefill_max_tokens
        if limit <= 0:
            return None
        d = self.directory
        uncached = {w.worker_id: len(ids) - d.prefixes.match(w.worker_id, ids) for w in d.of_role("decode")}
        fits = [w for w in d.of_role("decode") if uncached[w.worker_id] <= limit]
        if not fits:
            return None
        w = min(fits, key=lambda w: (uncached[w.worker_id], w.load))
        log.info("local prefill: request %s on %s (uncached %d of %d tokens <= %d)", st.rid, w.worker_id,
                 uncached[w.worker_id], len(ids), limit)
        return w

    def _send_generate(self, st: RequestState, siblings: Optional[list[str]] = None) -> None:
        if st.is_exhausted:                                # resumed with nothing left
            self._finish(st, TokensEvent([], None, "length"))
            return
        infos = self._register(st)
        peers = [infos[1].peer, infos[0].peer] if st.placement.is_pair else [None]
        for info, peer in zip(infos, peers):
            self._send(info.worker_id, protocol.Generate(
                rid=st.wire_rid, input_ids=list(st.input_ids), sampling=st.sampling, peer=peer,
                model=st.model, dllm=dict(st.dllm), output_ids=list(st.output_ids),
                siblings=list(siblings or ())))

    def _register(self, st: RequestState) -> list:
        """A new attempt of `st` on `st.workers`, in flight from now; -> their infos."""
        st.attempt += 1
        st.is_parked = False
        st.last_progress = time.monotonic()
        self.requests[st.wire_rid] = st
        if st.trace is not None:
            st.trace.route = st.placement.route
            st.trace.mark("dispatched", worker="router", attempt=st.attempt,
                          workers=",".join(st.workers))
        infos = [self.directory.get(w) for w in st.workers]
        for info in infos:
            info.num_inflight += 1
        return infos

    def _redispatch(self, st: RequestState, reason: str) -> None:
        """Move `st` off its workers (already aborted/dead) onto new ones, or park it."""
        self._release(st)
        if st.trace is not None:
            st.trace.redispatch(reason, st.attempt + 1)
        if st.attempt >= MAX_ATTEMPTS:
            self._fail(st, FailedEvent(500, f"{reason}; gave up after {st.attempt} attempts"))
            return
        if self._pick(st):
            log.info("request %s: %s; re-dispatched to %s", st.rid, reason, ",".join(st.workers))
            self._send_generate(st)
        else:
            log.warning("request %s: %s; parked until a worker is available", st.rid, reason)
            st.is_parked, st.placement = True, None
            self.requests[st.wire_rid] = st

    def _retry_parked(self) -> None:
        for st in [s for s in self.requests.values() if s.is_parked]:
            if self._pick(st):
                del self.requests[st.wire_rid]
                self._send_generate(st)

    # request endings
    def _release(self, st: RequestState) -> None:
        self.requests.pop(st.wire_rid, None)
        for w in st.workers:
            info = self.directory.get(w)
            if info is not None and info.num_inflight > 0:
                info.num_inflight -= 1

    def _finish(self, st: RequestState, event: TokensEvent) -> None:
        self._remember_finished(st)
        self._release(st)
        st.sink(event)

    def _remember_finished(self, st: RequestState) -> None:
        """The worker that streamed a finished request keeps its KV (prefix cache)."""
        if st.placement is not None and st.placement.route in ("pd", "local", "unified"):
            self.directory.record_finished(st.token_source, st.input_ids + st.output_ids)

    def _fail(self, st: RequestState, event: FailedEvent) -> None:
        self._release(st)
        st.sink(event)

    def _drop(self, st: RequestState, abort_on: tuple, reason: str) -> None:
        for w in abort_on:
            self._send(w, protocol.Abort(rid=st.wire_rid, reason=reason))
        self._release(st)

    # control loop
    def _loop(self) -> None:
        """Liveness is judged here, on the control plane's own thread, right after every
        queued heartbeat was read: a busy HTTP loop can delay neither."""
        next_check = last_check = time.monotonic()
        while not self._stopping.is_set():
            try:
                got = self.server.recv(timeout=TICK_S)
                with self.lock:
                    while got is not None:
                        self._handle(*got)
                        got = self.server.recv(timeout=0)
                    now = time.monotonic()
                    if now >= next_check:
                        stall = now - last_check - TICK_S * 2
                        if stall > STALL_S:                # NOTE: this thread was starved,
                            self.directory.excuse(stall)   # not the workers: do not convict
                        self._check_liveness(now)
                        last_check, next_check = now, now + TICK_S * 2
            except Exception:                              # the loop must survive anything
                log.exception("control loop error")

    def _handle(self, sender: str, msg) -> None:
        if isinstance(msg, protocol.Tokens):
            self._on_tokens(sender, msg)
        elif isinstance(msg, protocol.Heartbeat):
            self._on_heartbeat(sender, msg)
        elif isinstance(msg, protocol.RequestMarks):
            self._on_marks(sender, msg)
        elif isinstance(msg, protocol.Error):
            self._on_error(sender, msg)
        elif isinstance(msg, protocol.Register):
            self._on_register(sender, msg)
        else:
            log.warning("unexpected %s from %s: dropped", type(msg).__name__, sender)

    def _on_register(self, sender: str, msg) -> None:
        if msg.worker_id != sender:
            log.error("register from socket %r claims worker_id %r: dropped", sender, msg.worker_id)
            return
        info = WorkerInfo(msg.worker_id, msg.role, msg.model, dict(msg.capacity),
                          dict(msg.kv_fingerprint), msg.data_addr, msg.pid)
        old = self.directory.get(msg.worker_id) or self.directory.departed.get(msg.worker_id)
        if old is not None and (old.pid, old.data_addr) == (msg.pid, msg.data_addr):
            # the same process after a link blip: keep its requests, forget old attempts
            self._revive(msg.worker_id)
            return
        self._worker_gone(msg.worker_id, "worker registered again (restarted)")
        seen = self.num_restarts.get(msg.worker_id)
        self.num_restarts[msg.worker_id] = (msg.role, seen[1] + 1 if seen else 0)
        self.directory.add(info)
        log.info("registered %s (role=%s model=%s pid=%d data=%s)", msg.worker_id, msg.role,
                 msg.model, msg.pid, msg.data_addr or "-")
        self._retry_parked()

    def _revive(self, worker_id: str):
        """A worker declared dead is back (SIGCONT, link restored): tell it to drop the
        attempts that moved elsewhere meanwhile, then serve it again."""
        info = self.directory.get(worker_id) or self.directory.revive(worker_id)
        if info is not None and info.stale_rids:
            log.warning("%s is alive again after being declared dead: aborting %d stale "
                        "attempt(s) on it", worker_id, len(info.stale_rids))
            for rid in sorted(info.stale_rids):
                self._send(worker_id, protocol.Abort(rid=rid, reason="attempt moved elsewhere"))
            info.stale_rids.clear()
            self._retry_parked()
        return info

    def _on_heartbeat(self, sender: str, msg) -> None:
        info = self.directory.get(sender) or self._revive(sender)
        if info is None:
            return                                         # never registered here
        info.last_seen = time.monotonic()
        info.gauges = msg.gauges
        info.forward_ct = msg.forward_ct

    def _on_tokens(self, sender: str, msg) -> None:
        info = self.directory.get(sender)
        if info is not None:
            info.last_seen = time.monotonic()
        ready = []                                         # one hand-off for the whole step
        now = time.monotonic()
        for item in msg.items:
            st = self.requests.get(item.rid)
            if st is None or st.token_source != sender:
                continue                                   # finished, aborted or stale attempt
            if item.error:
                self._fail_and_abort(st, f"worker {sender}: {item.error}", sender)
                continue
            st.output_ids += item.token_ids
            if st.trace is not None:
                st.trace.add_tokens(len(item.token_ids), item.forward_iter)
            st.last_progress = now
            event = TokensEvent(list(item.token_ids), item.logprobs, item.finish_reason, item.top_logprobs,
                                item.prompt_logprobs)
            if item.finish_reason is not None:
                self._remember_finished(st)
                self._release(st)
            ready.append((st.sink, event))
        deliver_all(ready)

    def _on_marks(self, sender: str, msg) -> None:
        for item in msg.items:
            st = self.requests.get(item.rid)
            if st is not None and st.trace is not None and sender in st.workers:
                st.trace.merge_worker_marks({m.name: (m.t, m.attrs) for m in item.marks}, sender)

    def _on_error(self, sender: str, msg) -> None:
        st = self.requests.get(msg.rid)
        if st is None or sender not in st.workers:
            return
        reason = f"worker {sender}: {msg.reason}"
        if msg.retriable:                                  # a timeout: try another pair
            for w in st.workers:
                if w != sender:
                    self._send(w, protocol.Abort(rid=st.wire_rid, reason=reason))
            self._redispatch(st, reason)
        else:                                              # deterministic: fail it here
            self._fail_and_abort(st, reason, sender)

    def _fail_and_abort(self, st: RequestState, reason: str, sender: str) -> None:
        for w in st.workers:
            if w != sender:
                self._send(w, protocol.Abort(rid=st.wire_rid, reason=reason))
        self._fail(st, FailedEvent(500, reason))

    def _check_liveness(self, now: float) -> None:
        dead_after = self.cfg.timeouts.heartbeat_dead_after
        for wid in self.directory.silent_since(now - dead_after):
            self._worker_gone(wid, f"no heartbeat for {dead_after:g} s")
        limit = self.cfg.timeouts.request
        for st in [s for s in self.requests.values() if now - s.last_progress > limit]:
            reason = f"request timed out: no progress for {limit:g} s"
            self._drop(st, abort_on=st.workers, reason=reason)
            st.sink(FailedEvent(504, reason, "timeout"))

    def _worker_gone(self, worker_id: str, reason: str) -> bool:
        """Take `worker_id` out of service and move or fail the requests it held.

        A dead prefill worker moves only the requests it has not handed over yet (decode
        has streamed no token of them); the others stay on their decode worker."""
        info = self.directory.remove(worker_id)
        if info is None:
            return False
        affected = [s for s in self.requests.values() if worker_id in s.workers]
        info.stale_rids.update(s.wire_rid for s in affected)
        if info.role == "prefill":
            handed_over = [s for s in affected if s.output_ids and s.token_source != worker_id]
            for st in handed_over:
                st.placement = st.placement.without_prefill()
            affected = [s for s in affected if s not in handed_over]
        log.warning("worker %s is gone (%s): %d request(s) affected", worker_id, reason,
                    len(affected))
        resume = self.cfg.recovery.resume_on_decode_failure
        why = f"worker {worker_id} failed: {reason}"
        for st in affected:
            for w in st.workers:                           # survivors (and a stalled worker)
                self._send(w, protocol.Abort(rid=st.wire_rid, reason=why))
            if st.token_source == worker_id and st.output_ids and not resume:
                self._fail(st, FailedEvent(500, why))
            else:
                self._redispatch(st, why)
        return True

    def _send(self, worker_id: str, msg) -> None:
        try:
            self.server.send(worker_id, msg)
        except Exception as e:                             # unroutable peer, closed socket
            log.warning("send %s to %s failed: %s", type(msg).__name__, worker_id, e)

    # snapshots (for /health, /metrics, /internal/workers)
    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        with self.lock:
            return [w.describe(now) for w in self.directory.workers.values()]

    def restarts(self) -> dict[str, tuple[str, int]]:
        with self.lock:
            return dict(self.num_restarts)

    def rejected_frames(self) -> dict[str, int]:
        return dict(self.server.rejected_frames) if self.server is not None else {}

    def worker_stats(self) -> list[tuple[str, str, WorkerGauges]]:
        with self.lock:
            return [(w.role, w.worker_id, w.gauges)
                    for w in sorted(self.directory.workers.values(), key=lambda w: w.worker_id)]
