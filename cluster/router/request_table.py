"""The router's requests in flight, keyed by wire rid, and the ways an attempt starts and ends.

An attempt enters with `send_generate` (its workers' in-flight counts go up) and leaves
exactly once through `release` (finished, failed, dropped or moved elsewhere). A parked
request (no worker to take it) stays in the table without workers. Not thread-safe by
itself: the dispatcher holds its lock around every call.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from cluster.router.request_state import FailedEvent, RequestState, TokensEvent
from cluster.router.worker_directory import WorkerDirectory
from cluster.wire import protocol


class RequestTable:
    def __init__(self, directory: WorkerDirectory, send: Callable[[str, object], None]):
        self.directory, self.send = directory, send
        self.requests: dict[str, RequestState] = {}        # wire rid -> state

    def __len__(self) -> int:
        return len(self.requests)

    def get(self, wire_rid: str) -> Optional[RequestState]:
        return self.requests.get(wire_rid)

    def on(self, worker_id: str) -> list[RequestState]:
        """The requests whose current attempt involves `worker_id`."""
        return [s for s in self.requests.values() if worker_id in s.workers]

    # attempts start
    def send_generate(self, st: RequestState, siblings: Optional[list[str]] = None) -> None:
        """A new attempt of `st` on its placement: `generate` to each of its workers."""
        if st.is_exhausted:                                # resumed with nothing left
            self.finish(st, TokensEvent([], None, "length"))
            return
        infos = self.register(st)
        peers = [infos[1].peer, infos[0].peer] if st.placement.is_pair else [None]
        for info, peer in zip(infos, peers):
            self.send(info.worker_id, protocol.Generate(
                rid=st.wire_rid, input_ids=list(st.input_ids), sampling=st.sampling, peer=peer,
                model=st.model, dllm=dict(st.dllm), output_ids=list(st.output_ids),
                siblings=list(siblings or ())))

    def register(self, st: RequestState) -> list:
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

    def park(self, st: RequestState) -> None:
        """No worker can take `st` now: it waits here, without workers, for one to appear."""
        st.is_parked, st.placement = True, None
        self.requests[st.wire_rid] = st

    def unpark(self, st: RequestState) -> None:
        """Out of the table until its next attempt registers (no worker held it)."""
        self.requests.pop(st.wire_rid, None)

    def parked(self) -> list[RequestState]:
        return [s for s in self.requests.values() if s.is_parked]

    # attempts end
    def release(self, st: RequestState) -> None:
        self.requests.pop(st.wire_rid, None)
        for w in st.workers:
            info = self.directory.get(w)
            if info is not None and info.num_inflight > 0:
                info.num_inflight -= 1

    def finish(self, st: RequestState, event: TokensEvent) -> None:
        self.remember_finished(st)
        self.release(st)
        st.sink(event)

    def remember_finished(self, st: RequestState) -> None:
        """The worker that streamed a finished request keeps its KV (prefix cache)."""
        if st.placement is not None and st.placement.route in ("pd", "local", "unified"):
            self.directory.record_finished(st.token_source, st.input_ids + st.output_ids)

    def fail(self, st: RequestState, event: FailedEvent, abort_reason: Optional[str] = None,
             spare: Optional[str] = None) -> None:
        """End `st` with `event`; with `abort_reason`, its workers (but `spare`) drop the attempt."""
        if abort_reason is not None:
            self.abort_attempt(st, abort_reason, spare)
        self.release(st)
        st.sink(event)

    def drop(self, st: RequestState, reason: str) -> None:
        """The client is gone (or the router stops): every worker of the attempt drops it."""
        self.abort_attempt(st, reason)
        self.release(st)

    def abort_attempt(self, st: RequestState, reason: str, spare: Optional[str] = None) -> None:
        """`abort` for the current attempt to each of its workers but `spare` (the worker that
        reported the failure, or is gone)."""
        for w in st.workers:
            if w != spare:
                self.send(w, protocol.Abort(rid=st.wire_rid, reason=reason))
