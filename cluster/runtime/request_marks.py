"""A worker's share of request tracing: the moments of each request it sees, sent to the router.

The router assembles a request's phases from these marks (cluster/router/request_trace.py).
Each mark is a wall-clock time (`time.time()`, comparable across processes of one host)
plus a few attributes, always including the `forward_iter` of the batch it concerns, so a
phase names the `Prefill batch [N]` / `Decode batch [N]` line of the same iteration.
Marks queue here and leave in one `request_marks` message per flush; a role flushes
before it sends the tokens or KV that follow them, so the router has a request's marks
before its last token. The same moments are logged once per request, with its id.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
from cluster.wire import protocol as P

logger = logging.getLogger("pdcluster.requests")


def _first_steps(batch: ScheduleBatch) -> list[Req]:
    """The requests that may be in their first step of this kind: a decode step from the running
    batch knows which rows joined since the last one (the others were marked then)."""
    return batch.rows.joined if batch.rows is not None else batch.reqs


class MarkBook:
    def __init__(self, worker_id: str):
        self.worker_id = worker_id
        self._pending: dict[str, list[P.RequestMark]] = {}   # rid -> marks not sent yet
        self._seen: dict[str, dict] = {}               # rid -> mark name -> attrs (live requests)
        self._processing_iter: Optional[int] = None    # the batch being processed
        self.sampling_iter: Optional[int] = None       # the batch that sampled the tokens emitted now

    def mark(self, rid: str, name: str, t: Optional[float] = None, **attrs) -> None:
        self._seen.setdefault(rid, {})[name] = attrs
        self._pending.setdefault(rid, []).append(
            P.RequestMark(name, time.time() if t is None else t, attrs))

    def note(self, rid: str, key: str, **values) -> None:
        """Keep a private moment of a live request (not sent), e.g. when it was admitted."""
        self._seen.setdefault(rid, {})[key] = values

    def has(self, rid: str, name: str) -> bool:
        return name in self._seen.get(rid, ())

    def get(self, rid: str, name: str) -> Optional[dict]:
        return self._seen.get(rid, {}).get(name)

    # the moments every role shares (WorkerScheduler calls these)
    def on_launch(self, batch: ScheduleBatch) -> None:
        """run_batch launched `batch` (its forward_iter is set): a prompt's first chunk, or
        a request's first decode step."""
        name = "first_decode_launched" if batch.mode == ForwardMode.DECODE else "prefill_launched"
        t = time.time()
        for req in _first_steps(batch):
            if not req.is_finished and not self.has(req.rid, name):
                self.mark(req.rid, name, t, forward_iter=batch.forward_iter)

    def on_processing(self, batch: ScheduleBatch) -> None:
        """Before a batch's result is processed (and its tokens committed)."""
        self._processing_iter = self.sampling_iter = batch.forward_iter
        if batch.mode != ForwardMode.DECODE:
            return
        t = time.time()                    # (under overlap, a request that finished in the
        for req in _first_steps(batch):    # batch before still rides along: skipped)
            if not req.is_finished and not self.has(req.rid, "first_decode_done"):
                self.mark(req.rid, "first_decode_done", t, forward_iter=batch.forward_iter)

    def on_token(self, req: Req) -> None:
        """A token is emitted: the first one ends the prefill where the prompt ran here
        (unified, dllm); a decode worker marked `kv_received` instead."""
        seen = self._seen.get(req.rid, {})
        if "prefill_done" not in seen and "kv_received" not in seen:
            self.mark(req.rid, "prefill_done", forward_iter=self._processing_iter,
                      num_tokens=req.prompt_len)
            logger.info("request %s: prefilled in batch [%s], %d prompt tokens", req.rid,
                        self._processing_iter, req.prompt_len)

    def on_release(self, req: Req) -> None:
        """The request left this worker: its last decode step, if it had any, is the one
        being processed."""
        seen = self._seen.pop(req.rid, None) or {}
        if req.finish_reason in (None, "abort", "handed_off"):
            return
        first = seen.get("first_decode_done")
        if first is None:
            logger.info("request %s: finished (%s), %d tokens", req.rid, req.finish_reason,
                        req.num_output)
            return
        last = self._processing_iter
        self._pending.setdefault(req.rid, []).append(P.RequestMark(
            "decode_done", time.time(), {"forward_iter": last, "num_tokens": req.num_output}))
        logger.info("request %s: finished (%s), %d tokens, decode batches [%d]..[%d]", req.rid,
                    req.finish_reason, req.num_output, first["forward_iter"], last)

    def flush(self, control) -> None:
        if self._pending:
            items = [P.MarksItem(rid, marks) for rid, marks in self._pending.items()]
            self._pending = {}
            control.send(P.RequestMarks(worker_id=self.worker_id, items=items))
