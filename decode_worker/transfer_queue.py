"""TransferQueue: requests with reserved pages, waiting for their `kv_batch`."""
from __future__ import annotations

import time
from typing import Optional

from cluster.schedule_batch import Req


class TransferQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.entries: dict[str, tuple[Req, float, float]] = {}   # rid -> (req, ready_at, deadline)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, req: Req) -> None:
        now = time.monotonic()
        self.entries[req.rid] = (req, now, now + self.timeout_s)

    def pop(self, rid: str) -> Optional[tuple[Req, float]]:
        """(req, seconds since decode_ready) or None if the request is not expected."""
        entry = self.entries.pop(rid, None)
        return None if entry is None else (entry[0], time.monotonic() - entry[1])

    def remove(self, rid: str) -> None:
        self.entries.pop(rid, None)

    def pop_expired(self) -> list[Req]:
        now = time.monotonic()
        expired = [req for req, _, dl in self.entries.values() if dl < now]
        for req in expired:
            del self.entries[req.rid]
        return expired

    def reqs_from_peer(self, prefill_worker_id: str) -> list[Req]:
        return [req for req, *_ in self.entries.values() if req.peer and req.peer["worker_id"] == prefill_worker_id]
