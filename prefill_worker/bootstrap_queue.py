"""BootstrapQueue: prefill requests waiting for their decode worker's `decode_ready`.

Decode memory is never handed KV it did not reserve, so a request is prefilled only
after its decode worker said it reserved pages. `decode_ready` may beat the router's
`generate` to this worker (two sockets), so early readiness is remembered too.
"""
from __future__ import annotations

import time
from typing import Optional

from cluster.runtime.schedule_batch import Req
from cluster.wire.messages import Peer


class BootstrapQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.waiting: dict[str, tuple[Req, float]] = {}        # rid -> (req, deadline)
        self.early_ready: dict[str, tuple[Peer, float]] = {}   # rid -> (decode peer, deadline)

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, req: Req) -> Optional[Req]:
        """Queue `req`; returns it at once if its decode worker was already ready."""
        early = self.early_ready.pop(req.rid, None)
        if early is not None:
            req.peer = early[0]
            return req
        self.waiting[req.rid] = (req, time.monotonic() + self.timeout_s)
        return None

    def mark_ready(self, rid: str, decode_worker_id: str, decode_data_addr: str) -> Optional[Req]:
        peer = Peer(decode_worker_id, decode_data_addr)
        entry = self.waiting.pop(rid, None)
        if entry is None:
            self.early_ready[rid] = (peer, time.monotonic() + self.timeout_s)
            return None
        req = entry[0]
        req.peer = peer
        return req

    def remove(self, rid: str) -> None:
        self.waiting.pop(rid, None)
        self.early_ready.pop(rid, None)

    def pop_expired(self) -> list[Req]:
        now = time.monotonic()
        for rid in [r for r, (_, dl) in self.early_ready.items() if dl < now]:
            del self.early_ready[rid]
        expired = [req for req, dl in self.waiting.values() if dl < now]
        for req in expired:
            del self.waiting[req.rid]
        return expired
