"""The dispatcher's side of its HTTP front ends (`[router] api_servers` > 1).

Front ends connect to the dispatcher's control socket beside the workers (identities
`frontend-N`); the dispatcher's control loop hands their messages here, under its lock. A
submitted request becomes an ordinary RequestState whose sink is a `RemoteSink`, so tokens,
failures, retries and resumes run exactly as for a request of a single-process router; its
trace is begun here and ended when the front end says how the request ended. The hub also
answers the front ends' questions (control_answers.py), keeps each one's last report (its
router series and CPU time, which /metrics sums with this process's), and when a front end
dies aborts what it had admitted so the workers free those pages at once.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict

from cluster.router.control_answers import ControlAnswers
from cluster.router.errors import APIError
from cluster.router.mailbox import RemoteSink
from cluster.router.request_state import FailedEvent, RequestState
from cluster.wire.frontend_messages import (FrontendAbort, FrontendEnd, FrontendEvent, FrontendEvents,
                                            FrontendQuery, FrontendReply, FrontendReport, FrontendState,
                                            FrontendSubmit)

log = logging.getLogger("pdcluster.router")


class FrontendHub:
    def __init__(self, service, frontend_ids: list[str]):
        self.service, self.dispatcher = service, service.dispatcher
        self.answers = ControlAnswers(service)
        self.frontend_ids = set(frontend_ids)
        self.requests: dict[tuple[str, str], RequestState] = {}   # (front end, rid) -> state
        self.reports: dict[str, FrontendReport] = {}
        self.retired: dict[tuple, float] = defaultdict(float)      # series of front ends that died
        self._handlers = {FrontendSubmit: self._on_submit, FrontendAbort: self._on_abort,
                          FrontendEnd: self._on_end, FrontendQuery: self._on_query,
                          FrontendReport: self._on_report}

    def handle(self, sender: str, msg) -> None:
        """On the control loop, under the dispatcher's lock."""
        handler = self._handlers.get(type(msg))
        if sender not in self.frontend_ids or handler is None:
            log.warning("%s from %s: not a front end's message here, dropped", type(msg).__name__, sender)
            return
        handler(sender, msg)

    def send_events(self, frontend_id: str, items: list, plain: list) -> None:
        """[(rid, event)] and [(rid, plain token id)] of one worker message -> one
        `frontend_events` to that front end."""
        out, plain_rids, plain_ids = [], [rid for rid, _ in plain], [t for _, t in plain]
        for rid, ev in items:
            if isinstance(ev, FailedEvent):
                out.append(FrontendEvent(rid, [], status=ev.status, message=ev.message, error_type=ev.type))
                self.requests.pop((frontend_id, rid), None)
            elif ev.is_plain:
                plain_rids.append(rid)
                plain_ids.append(ev.token_ids[0])
            else:
                out.append(FrontendEvent(rid, ev.token_ids, ev.finish_reason, ev.logprobs, ev.top_logprobs,
                                         ev.prompt_logprobs))
                if ev.finish_reason is not None:
                    self.requests.pop((frontend_id, rid), None)
        self.dispatcher.send(frontend_id, FrontendEvents(out, plain_rids, plain_ids))

    def frontend_gone(self, frontend_id: str, reason: str) -> int:
        """A front end exited: its requests are aborted on their workers; its series are kept."""
        with self.dispatcher.lock:
            gone = [key for key in self.requests if key[0] == frontend_id]
            for key in gone:
                self.dispatcher.abort(self.requests.pop(key), reason)
            report = self.reports.pop(frontend_id, None)
            for s in report.samples if report is not None else ():
                self.retired[_key(s)] += s.value
        return len(gone)

    # /metrics: every front end's series, summed, and each one's CPU time
    def summed_samples(self) -> dict[tuple, float]:
        total = defaultdict(float, self.retired)
        for report in list(self.reports.values()):
            for s in report.samples:
                total[_key(s)] += s.value
        return total

    def cpu_seconds(self) -> dict[str, float]:
        return {fid: r.cpu_seconds for fid, r in sorted(self.reports.items())}

    # messages
    def _on_submit(self, sender: str, msg: FrontendSubmit) -> None:
        tracing, sts = self.service.tracing, []
        for r in msg.requests:
            st = RequestState(rid=r.rid, model=r.model, route=r.route, input_ids=r.input_ids, sampling=r.sampling,
                              dllm=dict(r.dllm), sink=RemoteSink(self, sender, r.rid))
            st.trace = tracing.begin(r.rid, r.model, r.route, r.arrival, r.traceparent)
            self.requests[(sender, r.rid)] = st
            sts.append(st)
        try:
            if len(sts) == 1:
                self.dispatcher.submit(sts[0])
            else:
                self.dispatcher.submit_group(sts)
        except Exception as e:                             # refused (APIError) or a bug: the front end hears it
            for st in sts:
                self.requests.pop((sender, st.rid), None)
            if not isinstance(e, APIError):
                log.exception("submit from %s failed", sender)
                e = APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")
            retry = e.headers.get("Retry-After")
            self._reply(sender, msg.ticket, e.status, json.dumps(e.body()), int(retry) if retry else None)
            return
        self._reply(sender, msg.ticket, 200, "{}")

    def _on_abort(self, sender: str, msg: FrontendAbort) -> None:
        st = self.requests.pop((sender, msg.rid), None)
        if st is not None:
            self.dispatcher.abort(st, msg.reason)

    def _on_end(self, sender: str, msg: FrontendEnd) -> None:
        trace = self.service.tracing.get(msg.rid)
        if trace is not None:
            self.service.tracing.end(trace, msg.outcome, msg.finish_reason, msg.error)

    def _on_query(self, sender: str, msg: FrontendQuery) -> None:
        answer = self.answers.answer(msg.what, msg.args)
        body = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)
        self._reply(sender, msg.ticket, answer.status, body, answer.retry_after)

    def _on_report(self, sender: str, msg: FrontendReport) -> None:
        self.reports[sender] = msg
        if self.service.slo is not None:
            for ttft, tpot in msg.slo:
                self.service.slo.observe(ttft, tpot)
        self.dispatcher.send(sender, FrontendState(self.dispatcher.dllm_models()))

    def _reply(self, sender: str, ticket: int, status: int, body: str, retry_after=None) -> None:
        self.dispatcher.send(sender, FrontendReply(ticket, status, body, retry_after))


def _key(sample) -> tuple:
    return sample.name, tuple(sorted(sample.labels.items()))
