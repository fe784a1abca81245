"""BootstrapQueue: prefill requests waiting for their decode worker's `decode_ready`.

Decode memory is never handed KV it did not reserve, so a request is prefilled only
after its decode worker said it reserved pages. `decode_ready` may beat the router's
`generate` to this worker (two sockets), so early readiness is remembered too; both
wait at most `timeouts.decode_ready`.
"""
from __future__ import annotations

from typing import Optional

from cluster.runtime.deadline_queue import DeadlineQueue
from cluster.runtime.schedule_batch import Req
from cluster.wire.messages import Peer


class BootstrapQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.waiting: DeadlineQueue[Req] = DeadlineQueue(timeout_s)
        self.early_ready: DeadlineQueue[Peer] = DeadlineQueue(timeout_s)   # decode peers by rid

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, req: Req) -> Optional[Req]:
        """Queue `req`; returns it at once if its decode worker was already ready."""
        peer = self.early_ready.pop(req.rid)
        if peer is not None and _is_chosen(req, peer):
            return req
        self.waiting.put(req.rid, req)
        return None

    def mark_ready(self, rid: str, peer: Peer) -> Optional[Req]:
        """The request, once the decode worker the router chose for it (no other: the KV
        holds the user's prompt) has reserved its pages."""
        entry = self.waiting.entries.get(rid)
        req = entry[0] if entry is not None else None
        if req is None:
            self.early_ready.put(rid, peer)
            return None
        if not _is_chosen(req, peer):
            return None
        return self.waiting.pop(rid)

    def remove(self, rid: str) -> None:
        self.waiting.pop(rid)
        self.early_ready.pop(rid)

    def pop_expired(self) -> list[Req]:
        self.early_ready.pop_expired()            # readiness nobody asked for
        return self.waiting.pop_expired()


def _is_chosen(req: Req, peer: Peer) -> bool:
    """`peer` is the decode worker (id and data address) the router paired `req` with."""
    if req.peer is None:
        req.peer = peer                   # no router choice to hold it to (tests, tools)
        return True
    return (req.peer.worker_id, req.peer.data_addr) == (peer.worker_id, peer.data_addr)
