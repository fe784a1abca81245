"""The router's control loop: worker registry, dispatch, token fan-in.

Workers' messages are handled on the ControlServer's own I/O thread as each is decoded (no
queue and no second thread woken per worker step), under `self.lock`, which guards all
request and worker state; a liveness thread judges silent workers and stalled requests
under the same lock. HTTP coroutines enter only through `submit`, `abort`, `worker_exited`
and the read-only snapshots, each taking the lock briefly. Events reach a request's coroutine
through its thread-safe `sink` (a Mailbox), so the loop never blocks on a client. The
requests in flight are a RequestTable (request_table.py); which workers serve a request is
the Placer's (placer.py); what happens when a worker fails, goes silent or comes back is
Failover's (failover.py, where the rules are listed).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from cluster.wire import protocol
from cluster.config import ClusterConfig
from cluster.roles import served_model
from cluster.router.errors import overloaded
from cluster.router.failover import Failover
from cluster.router.mailbox import deliver_all
from cluster.router.placer import Placer
from cluster.router.request_state import FailedEvent, RequestState, TokensEvent
from cluster.router.request_table import RequestTable
from cluster.router.request_trace import TokenArrival
from cluster.router.role_switch import RoleSwitches
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
from cluster.wire.frontend_messages import FRONTEND_MESSAGES
from cluster.wire.gauges import WorkerGauges

log = logging.getLogger("pdcluster.router")
CHECK_S = 0.1                   # liveness is judged this often, or a tenth of heartbeat_dead_after if longer
MAX_CHECK_S = 0.5               # ... but at least this often (a wake-up per check costs the streams' CPU)
STALL_S = 0.5                   # a longer gap between liveness checks means this process stalled


class Dispatcher:
    def __init__(self, cfg: ClusterConfig, control_endpoint: Optional[str] = None):
        self.cfg = cfg
        self.control_endpoint = control_endpoint or cfg.router.control
        self.lock = threading.RLock()
        self.directory = WorkerDirectory(cfg.router.policy)
        self.table = RequestTable(self.directory, self.send)
        self.requests = self.table.requests               # wire rid -> state
        self.placer = Placer(self.directory, cfg.router.local_prefill_max_tokens,
                             {served_model(cfg, g): g for g in cfg.groups if g.role == "dllm"}, ttft=cfg.slo.ttft)
        self.failover = Failover(cfg, self.directory, self.table, self.placer.place)
        self.num_restarts: dict[str, tuple[str, int]] = {}  # worker id -> (role, registrations - 1)
        self.role_switches = RoleSwitches(self.directory, self.send)
        self.server = None
        self.frontends = None                             # a FrontendHub when api_servers > 1
        self._thread: Optional[threading.Thread] = None
        self._stopping = threading.Event()

    # lifecycle
    def start(self) -> str:
        from cluster.wire.curve import endpoint_host, keys_for
        from cluster.wire.transport import ControlServer
        curve = keys_for(self.cfg.security, [endpoint_host(self.control_endpoint)])
        self.server = ControlServer(self.control_endpoint, on_message=self._on_message, curve=curve)
        self.control_endpoint = self.server.endpoint
        self._thread = threading.Thread(target=self._check_loop, name="router-liveness", daemon=True)
        self._thread.start()
        log.info("control endpoint %s", self.control_endpoint)
        return self.control_endpoint

    def fail_all(self, reason: str) -> None:
        with self.lock:
            for st in list(self.requests.values()):
                self.table.fail(st, FailedEvent(503, reason, "service_unavailable"), abort_reason=reason)

    def shutdown_workers(self, reason: str) -> None:
        """End of a drain: workers started by hand stop too (the launcher's would be
        stopped by it anyway)."""
        with self.lock:
            for wid in list(self.directory.workers):
                self.send(wid, protocol.Shutdown(reason=reason))

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
            self._check_room(1)
            self._place_or_refuse(st)
            self.table.send_generate(st)

    def submit_group(self, sts: list[RequestState]) -> None:
        """n > 1 choices of one prompt (same ids and parameters but the seed): one `generate`
        to one pair, the others riding along as its `siblings`, so the prompt is prefilled
        and its KV sent once. Each choice is still its own request here (tokens, abort, retry
        and re-dispatch alone: a retried choice is re-prefilled by itself). Where forking
        does not apply (no pair, echo logprobs, a grammar), each is submitted as usual."""
        with self.lock:
            self._check_room(len(sts))
            first, rest = sts[0], sts[1:]
            self._place_or_refuse(first)
            sp = first.sampling
            if first.placement.route != "pd" or sp.prompt_logprobs or sp.grammar_kind:
                self.table.send_generate(first)
                for st in rest:
                    self._place_or_refuse(st)
                    self.table.send_generate(st)
                return
            for st in rest:
                st.placement = first.placement
                self.table.register(st)
            self.table.send_generate(first, siblings=[st.wire_rid for st in rest])

    async def admit(self, sts: list[RequestState]) -> None:
        """The HTTP side's one entry: one request, or n choices of one prompt; APIError 503
        when they do not fit (a front end's DispatcherLink.admit has the same shape)."""
        if len(sts) == 1:
            self.submit(sts[0])
        else:
            self.submit_group(sts)

    def dllm_models(self) -> list[str]:
        return self.directory.dllm_models()

    def _check_room(self, num_new: int) -> None:
        limit = self.cfg.router.max_queued_requests
        if self.num_in_flight + num_new > limit:
            raise overloaded(f"{self.num_in_flight} requests in flight (router.max_queued_requests = "
                             f"{limit}); retry later")

    def _place_or_refuse(self, st: RequestState) -> None:
        if not self.placer.place(st):
            raise overloaded(f"no live worker serves model {st.model!r}", retry_after=2)

    def switch_role(self, worker_id: str, role: str) -> dict:
        with self.lock:
            return self.role_switches.begin(worker_id, role).describe(time.monotonic())

    def abort(self, st: RequestState, reason: str) -> None:
        with self.lock:
            if self.requests.get(st.wire_rid) is st:
                self.table.drop(st, reason)

    def worker_exited(self, worker_id: str, reason: str) -> bool:
        with self.lock:
            return self.failover.worker_gone(worker_id, reason)

    @property
    def num_in_flight(self) -> int:
        return len(self.requests)

    # control loop
    def _on_message(self, got: tuple) -> None:
        """On the control socket's I/O thread (exceptions are logged there, the thread lives on)."""
        with self.lock:
            self._handle(*got)

    def _check_loop(self) -> None:
        """Liveness is judged on a thread of its own: a busy HTTP loop cannot delay it."""
        check_s = min(MAX_CHECK_S, max(CHECK_S, self.cfg.timeouts.heartbeat_dead_after / 10))
        last_check = time.monotonic()
        while not self._stopping.wait(check_s):
            try:
                with self.lock:
                    now = time.monotonic()
                    stall = now - last_check - check_s
                    if stall > STALL_S:                    # NOTE: this process was starved,
                        self.directory.excuse(stall)       # not the workers: do not convict
                    self.failover.check_liveness(now)
                    last_check = now
            except Exception:                              # the loop must survive anything
                log.exception("liveness check error")

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
        elif isinstance(msg, FRONTEND_MESSAGES) and self.frontends is not None:
            self.frontends.handle(sender, msg)
        else:
            log.warning("unexpected %s from %s: dropped", type(msg).__name__, sender)

    def _on_register(self, sender: str, msg) -> None:
        if msg.worker_id != sender:
            log.error("register from socket %r claims worker_id %r: dropped", sender, msg.worker_id)
            return
        info = WorkerInfo(msg.worker_id, msg.role, msg.model, dict(msg.capacity),
                          dict(msg.kv_fingerprint), msg.data_addr, msg.pid)
        old = self.directory.get(msg.worker_id) or self.directory.departed.get(msg.worker_id)
        if self.role_switches.finish(old, msg):           # drained, not restarted
            self.directory.add(info)
            self.failover.retry_parked()
            return
        if old is not None and (old.pid, old.data_addr) == (msg.pid, msg.data_addr):
            # the same process after a link blip: keep its requests, forget old attempts
            self.failover.revive(msg.worker_id)
            return
        self.failover.worker_gone(msg.worker_id, "worker registered again (restarted)")
        seen = self.num_restarts.get(msg.worker_id)
        self.num_restarts[msg.worker_id] = (msg.role, seen[1] + 1 if seen else 0)
        self.directory.add(info)
        log.info("registered %s (role=%s model=%s pid=%d data=%s)", msg.worker_id, msg.role,
                 msg.model, msg.pid, msg.data_addr or "-")
        self.failover.retry_parked()

    def _on_heartbeat(self, sender: str, msg) -> None:
        info = self.directory.get(sender) or self.failover.revive(sender)
        if info is None:
            return                                         # never registered here
        info.last_seen = time.monotonic()
        info.gauges = msg.gauges
        info.forward_ct = msg.forward_ct
        info.num_dispatched_tokens = 0                     # the gauges count them now

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
                reason = f"worker {sender}: {item.error}"
                self.table.fail(st, FailedEvent(500, reason), abort_reason=reason, spare=sender)
                continue
            st.output_ids += item.token_ids
            if st.trace is not None:
                st.trace.add_tokens(len(item.token_ids), item.forward_iter)
            st.last_progress = now
            event = TokensEvent(list(item.token_ids), item.logprobs, item.finish_reason, item.top_logprobs,
                                item.prompt_logprobs)
            if item.finish_reason is not None:
                self.table.remember_finished(st)
                self.table.release(st)
            ready.append((st.sink, event))
        deliver_all(ready, self._plain_tokens(sender, msg.plain, now) if msg.plain is not None else ())

    def _plain_tokens(self, sender: str, rows, now: float) -> list:
        """(sink, token id) of a step's packed rows: one token each and nothing else, so no
        item or event is built per row."""
        requests = self.requests
        arrival = TokenArrival(time.time(), 1, rows.forward_iter)   # one for the step: no object per row
        out = []
        for rid, token_id in zip(rows.rids, rows.token_ids):
            st = requests.get(rid)
            # NOTE: `token_source` inline (a property call per row); every read here is cold
            if st is None or (placement := st.placement) is None or placement.decode != sender:
                continue                                   # finished, aborted or stale attempt
            st.output_ids.append(token_id)
            if (trace := st.trace) is not None:
                trace.add_arrival(arrival)
            st.last_progress = now
            out.append((st.sink, token_id))
        return out

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
            self.table.abort_attempt(st, reason, spare=sender)
            self.failover.redispatch(st, reason)
        else:                                              # deterministic: fail it here
            self.table.fail(st, FailedEvent(500, reason), abort_reason=reason, spare=sender)

    def send(self, worker_id: str, msg) -> None:
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
