"""Retry and failover at the router: workers that are gone, requests moved, parked or failed.

Rules (the failure semantics of docs/ARCHITECTURE.md):
- a worker is gone when the launcher says so, when it is silent for
  `timeouts.heartbeat_dead_after`, or when it registers again under the same id;
- a request with no token yet is re-dispatched to another worker / pair, at most
  MAX_ATTEMPTS attempts in all; with none available it is parked until one registers;
- a request with tokens already sent resumes when `recovery.resume_on_decode_failure`
  (`generate` with the prompt, the tokens sent so far and the original sampling
  parameters, whose max_tokens / min_tokens count those tokens too), else fails;
- a dead prefill worker moves only the requests it has not handed over yet (a token streamed,
  or the KV landed: a DLLM worker streams nothing until its first block is done);
- the surviving side of a pair gets `abort` for the attempt; tokens of an old attempt are
  ignored (every attempt has its own wire rid); a worker declared dead that comes back is
  told to drop the attempts that moved meanwhile;
- a request without progress for `timeouts.request` fails with a timeout.
Not thread-safe by itself: the dispatcher holds its lock around every call.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from cluster.config import ClusterConfig
from cluster.router.request_state import FailedEvent, RequestState
from cluster.router.request_table import RequestTable
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
from cluster.wire import protocol

log = logging.getLogger("pdcluster.router")
MAX_ATTEMPTS = 4


class Failover:
    def __init__(self, cfg: ClusterConfig, directory: WorkerDirectory, table: RequestTable,
                 place: Callable[[RequestState], bool]):
        """`place(st)` sets `st.placement` to a new choice of workers; False when none serves it."""
        self.cfg, self.directory, self.table, self.place = cfg, directory, table, place

    def redispatch(self, st: RequestState, reason: str) -> None:
        """Move `st` off its workers (already aborted or dead) onto new ones, or park it."""
        self.table.release(st)
        if st.trace is not None:
            st.trace.redispatch(reason, st.attempt + 1)
        if st.attempt >= MAX_ATTEMPTS:
            self.table.fail(st, FailedEvent(500, f"{reason}; gave up after {st.attempt} attempts"))
            return
        if self.place(st):
            log.info("request %s: %s; re-dispatched to %s", st.rid, reason, ",".join(st.workers))
            self.table.send_generate(st)
        else:
            log.warning("request %s: %s; parked until a worker is available", st.rid, reason)
            self.table.park(st)

    def retry_parked(self) -> None:
        for st in self.table.parked():
            if self.place(st):
                self.table.unpark(st)
                self.table.send_generate(st)

    def worker_gone(self, worker_id: str, reason: str) -> bool:
        """Take `worker_id` out of service and move or fail the requests it held; False when
        it was not in service."""
        info = self.directory.remove(worker_id)
        if info is None:
            return False
        affected = self.table.on(worker_id)
        info.stale_rids.update(s.wire_rid for s in affected)
        if info.role == "prefill":                         # decode streams the handed-over ones
            handed_over = [s for s in affected if s.token_source != worker_id and is_handed_over(s)]
            for st in handed_over:
                st.placement = st.placement.without_prefill()
            affected = [s for s in affected if s not in handed_over]
        log.warning("worker %s is gone (%s): %d request(s) affected", worker_id, reason, len(affected))
        resume = self.cfg.recovery.resume_on_decode_failure
        why = f"worker {worker_id} failed: {reason}"
        for st in affected:
            self.table.abort_attempt(st, why)              # survivors (and a stalled worker)
            if st.token_source == worker_id and st.output_ids and not resume:
                self.table.fail(st, FailedEvent(500, why))
            else:
                self.redispatch(st, why)
        return True

    def revive(self, worker_id: str) -> Optional[WorkerInfo]:
        """A worker declared dead is back (SIGCONT, link restored): tell it to drop the
        attempts that moved elsewhere meanwhile, then serve it again."""
        info = self.directory.get(worker_id) or self.directory.revive(worker_id)
        if info is not None and info.stale_rids:
            log.warning("%s is alive again after being declared dead: aborting %d stale "
                        "attempt(s) on it", worker_id, len(info.stale_rids))
            for rid in sorted(info.stale_rids):
                self.table.send(worker_id, protocol.Abort(rid=rid, reason="attempt moved elsewhere"))
            info.stale_rids.clear()
            self.retry_parked()
        return info

    def check_liveness(self, now: float) -> None:
        dead_after = self.cfg.timeouts.heartbeat_dead_after
        for wid in self.directory.silent_since(now - dead_after):
            self.worker_gone(wid, f"no heartbeat for {dead_after:g} s")
        limit = self.cfg.timeouts.request
        for st in [s for s in self.table.requests.values() if now - s.last_progress > limit]:
            reason = f"request timed out: no progress for {limit:g} s"
            self.table.fail(st, FailedEvent(504, reason, "timeout"), abort_reason=reason)


def is_handed_over(st: RequestState) -> bool:
    """Its KV left the prefill worker for good: decode streamed a token, or marked it received."""
    return bool(st.output_ids) or (st.trace is not None and "kv_received" in st.trace.marks)
