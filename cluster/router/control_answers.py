"""What only the process that owns the dispatcher can answer: /health, /metrics, a request's
phases (/debug), the worker lists of /internal and /admin, a worker's exit, a role switch.

The HTTP routes ask through `ask(what, args)` and turn the `Answer` into a response. With one
router process (`api_servers` = 1) `ControlAnswers.ask` answers at once from this process's
state; a front end's `DispatcherLink.ask` sends the same question as a `frontend_query` and
the dispatcher answers it with this class. Authorization stays with the route: it is about
the HTTP request, not the state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from cluster.roles import ROLES
from cluster.router.errors import APIError

ADMIN_GAUGES = ("num_running_reqs", "num_queue_reqs", "token_usage")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any                                  # a JSON value; /metrics: the Prometheus page (str)
    retry_after: Optional[int] = None


class ControlAnswers:
    def __init__(self, service):
        self.service, self.dispatcher = service, service.dispatcher
        self._answers: dict[str, Callable[[dict], Answer]] = {
            "health": self.health, "metrics": self.metrics, "debug_request": self.debug_request,
            "internal_workers": self.internal_workers, "worker_exit": self.worker_exit,
            "admin_workers": self.admin_workers, "switch_role": self.switch_role}

    def answer(self, what: str, args: dict) -> Answer:
        try:
            return self._answers[what](args)
        except APIError as e:
            return Answer(e.status, e.body())

    async def ask(self, what: str, args: Optional[dict] = None) -> Answer:
        return self.answer(what, args or {})

    def health(self, args: dict) -> Answer:
        """200 "ok"; 200 "degraded" while decode workers serve without a prefill worker (they
        prefill themselves: decode-side prefill under an [slo], or local prefill); else 503."""
        d, draining, cfg = self.dispatcher, self.service.is_draining, self.service.cfg
        with d.lock:
            counts = {r: d.directory.count(r) for r in ROLES}
            # a cluster of DLLM workers alone (prefill workers at most beside them) serves no main model
            serves_main = any(g.count and g.role in ("decode", "unified") for g in cfg.groups)
            up = d.directory.can_serve_main() if serves_main else d.directory.count("dllm") > 0
        decode_prefills = cfg.slo.ttft is not None or cfg.router.local_prefill_max_tokens > 0
        degraded = serves_main and not up and counts["decode"] > 0 and decode_prefills
        ok = (up or degraded) and not draining
        status = ("ok" if up else "degraded") if ok else ("draining" if draining else "unavailable")
        body = {"status": status, "workers": counts, "num_requests_in_flight": d.num_in_flight}
        return Answer(200 if ok else 503, body)

    def metrics(self, args: dict) -> Answer:
        return Answer(200, self.service.metrics.render().decode())

    def debug_request(self, args: dict) -> Answer:
        tracing = self.service.tracing
        trace = tracing.get(str(args.get("request_id", "")))
        if trace is None:
            raise APIError(404, f"no recent request {args.get('request_id')!r} (the router keeps the last "
                           f"{tracing.recent.capacity})", "not_found_error")
        return Answer(200, trace.to_json())

    def internal_workers(self, args: dict) -> Answer:
        return Answer(200, {"workers": self.dispatcher.snapshot(),
                            "control_endpoint": self.dispatcher.control_endpoint})

    def worker_exit(self, args: dict) -> Answer:
        worker_id = str(args.get("worker_id", ""))
        known = self.dispatcher.worker_exited(worker_id, str(args.get("reason") or "process exited"))
        return Answer(200, {"worker_id": worker_id, "was_registered": known})

    def admin_workers(self, args: dict) -> Answer:
        d, now = self.dispatcher, time.monotonic()
        with d.lock:
            workers = [{**w.describe(now), "load": w.load, **{g: getattr(w.gauges, g) for g in ADMIN_GAUGES}}
                       for w in sorted(d.directory.workers.values(), key=lambda w: w.worker_id)]
        return Answer(200, {"workers": workers})

    def switch_role(self, args: dict) -> Answer:
        return Answer(202, self.dispatcher.switch_role(str(args.get("worker_id", "")), str(args.get("role", ""))))
