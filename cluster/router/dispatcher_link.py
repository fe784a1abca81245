"""A front end's stand-in for the Dispatcher (`[router] api_servers` > 1).

The front end's RouterService talks to it as it would to the Dispatcher: `admit` (a round
trip: a refusal is the same APIError), `abort`, `num_in_flight` (its own requests),
`fail_all`, `dllm_models`. Events come back on the control client's I/O thread, one
`frontend_events` message per worker step, and reach the requests' mailboxes through
`deliver_all`: one wake-up of the HTTP loop per message. Tracing and the SLO window live with
the dispatcher: `RemoteTracing` sends how a request ended, `RemoteSlo` batches its samples into
the periodic `frontend_report`, which also carries this process's router series and CPU time.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from typing import Optional

from cluster.router.control_answers import Answer
from cluster.router.errors import APIError
from cluster.router.mailbox import deliver_all
from cluster.router.request_state import FailedEvent, RequestState, TokensEvent
from cluster.wire.curve import endpoint_host, keys_for
from cluster.wire.frontend_messages import (FrontendAbort, FrontendEnd, FrontendEvents, FrontendQuery,
                                            FrontendReply, FrontendReport, FrontendRequest, FrontendState,
                                            FrontendSubmit)
from cluster.wire.transport import ControlClient

log = logging.getLogger("pdcluster.router")
REPORT_S = 0.5                 # metrics and SLO samples reach the dispatcher this often
ASK_TIMEOUT_S = 30.0           # a dispatcher that does not answer this long: 503


class RemoteTrace:
    """What a front end keeps of a request's trace: the dispatcher holds the trace itself."""
    __slots__ = ("rid", "arrival", "traceparent", "is_finished")

    def __init__(self, rid: str, arrival: float, traceparent: Optional[str]):
        self.rid, self.arrival, self.traceparent, self.is_finished = rid, arrival, traceparent, False


class RemoteTracing:
    def __init__(self, link: "DispatcherLink"):
        self.link = link

    def begin(self, rid: str, model: str, route: str, arrival: float,
              traceparent: Optional[str] = None) -> RemoteTrace:
        return RemoteTrace(rid, arrival, traceparent)      # begun by the dispatcher on submit

    def end(self, trace: RemoteTrace, outcome: str, finish_reason: Optional[str] = None,
            error: Optional[str] = None) -> None:
        if not trace.is_finished:
            trace.is_finished = True
            self.link.client.send(FrontendEnd(trace.rid, outcome, finish_reason, error))

    def close(self) -> None:
        pass


class RemoteSlo:
    def __init__(self):
        self.pending: list[list] = []

    def observe(self, ttft: float, tpot: Optional[float]) -> None:
        self.pending.append([ttft, tpot])


class DispatcherLink:
    def __init__(self, cfg, frontend_id: str, endpoint: str):
        self.frontend_id = frontend_id
        self.requests: dict[str, RequestState] = {}        # rid -> state, until finished
        self.tracing = RemoteTracing(self)
        self.slo = RemoteSlo() if cfg.slo.is_set else None
        self.metrics = None
        self._tickets = itertools.count(1)
        self._waiting: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._dllm_models: list[str] = []
        self._stop = threading.Event()
        self._reporter = threading.Thread(target=self._report_loop, name="frontend-report", daemon=True)
        self.client = ControlClient(endpoint, frontend_id, on_message=self._on_message,
                                    curve=keys_for(cfg.security, [endpoint_host(endpoint)]))

    def attach(self, metrics) -> None:
        """Start reporting `metrics` (the front end's RouterMetrics) to the dispatcher."""
        self.metrics = metrics
        self._reporter.start()

    # the Dispatcher's shape, for RouterService
    @property
    def num_in_flight(self) -> int:
        return len(self.requests)

    def dllm_models(self) -> list[str]:
        return list(self._dllm_models)

    async def admit(self, sts: list[RequestState]) -> None:
        for st in sts:
            self.requests[st.rid] = st
        submit = FrontendSubmit(next(self._tickets), [
            FrontendRequest(st.rid, st.model, st.route, list(st.input_ids), st.sampling, dict(st.dllm),
                            st.trace.arrival, st.trace.traceparent) for st in sts])
        try:
            reply = await self._ask(submit)
        except BaseException:                              # no answer: never let it run unseen
            for st in sts:
                self.abort(st, "admission was not answered")
            raise
        if reply.status != 200:
            for st in sts:
                self.requests.pop(st.rid, None)
            error = json.loads(reply.body)["error"]
            headers = {"Retry-After": str(reply.retry_after)} if reply.retry_after is not None else None
            raise APIError(reply.status, error["message"], error["type"], error["code"], headers)

    def abort(self, st: RequestState, reason: str) -> None:
        if self.requests.pop(st.rid, None) is not None:
            self.client.send(FrontendAbort(st.rid, reason))

    def fail_all(self, reason: str) -> None:
        for st in list(self.requests.values()):
            self.abort(st, reason)
            st.sink(FailedEvent(503, reason, "service_unavailable"))

    def shutdown_workers(self, reason: str) -> None:
        """The dispatcher's process stops the workers when it ends, not a front end."""

    async def ask(self, what: str, args: Optional[dict] = None) -> Answer:
        """A question for the dispatcher (control_answers.py); /metrics reports this process first."""
        if what == "metrics":
            self._report()
        reply = await self._ask(FrontendQuery(next(self._tickets), what, dict(args or {})))
        body = reply.body if what == "metrics" and reply.status == 200 else json.loads(reply.body)
        return Answer(reply.status, body, reply.retry_after)

    def close(self) -> None:
        self._stop.set()
        self.client.close()

    # plumbing
    async def _ask(self, msg) -> FrontendReply:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting[msg.ticket] = (loop, future)
        try:
            self.client.send(msg)
            return await asyncio.wait_for(future, ASK_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise APIError(503, f"the router's dispatcher did not answer in {ASK_TIMEOUT_S:g} s",
                           "service_unavailable", headers={"Retry-After": "1"}) from None
        finally:
            self._waiting.pop(msg.ticket, None)

    def _on_message(self, msg) -> None:
        """On the control client's I/O thread."""
        if isinstance(msg, FrontendEvents):
            deliver_all(self._events(msg.items), self._plain_tokens(msg.plain_rids, msg.plain_token_ids))
        elif isinstance(msg, FrontendReply):
            waiting = self._waiting.get(msg.ticket)
            if waiting is not None:
                waiting[0].call_soon_threadsafe(_resolve, waiting[1], msg)
        elif isinstance(msg, FrontendState):
            self._dllm_models = list(msg.dllm_models)
        else:
            log.warning("front end %s: unexpected %s dropped", self.frontend_id, type(msg).__name__)

    def _events(self, items: list) -> list:
        pairs = []
        for item in items:
            st = self.requests.get(item.rid)
            if st is None:
                continue                                   # aborted here meanwhile
            if item.status is not None:
                event = FailedEvent(item.status, item.message or "", item.error_type or "internal_error")
            else:
                event = TokensEvent(item.token_ids, item.logprobs, item.finish_reason, item.top_logprobs,
                                    item.prompt_logprobs)
            if item.status is not None or item.finish_reason is not None:
                self.requests.pop(item.rid, None)
            pairs.append((st.sink, event))
        return pairs

    def _plain_tokens(self, rids: list, token_ids: list) -> list:
        requests = self.requests
        return [(st.sink, t) for rid, t in zip(rids, token_ids) if (st := requests.get(rid)) is not None]

    def _report(self) -> None:
        if self.metrics is None:
            return
        slo = []
        if self.slo is not None:
            slo, self.slo.pending = self.slo.pending, []
        self.client.send(FrontendReport(os.getpid(), time.process_time(), self.metrics.samples(), slo))

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_S):
            try:
                self._report()
            except Exception:                              # the reports must outlive a bad one
                log.exception("front end %s: report failed", self.frontend_id)


def _resolve(future: asyncio.Future, reply: FrontendReply) -> None:
    if not future.done():
        future.set_result(reply)
