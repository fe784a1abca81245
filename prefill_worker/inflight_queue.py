"""InflightQueue: prefilled requests whose KV was sent, until decode acks it."""
from __future__ import annotations

import time

from cluster.runtime.schedule_batch import Req


class InflightQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.entries: dict[str, tuple[Req, float, float, int]] = {}   # rid -> (req, sent_at, deadline, bytes)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, req: Req, num_bytes: int) -> None:
        now = time.monotonic()
        self.entries[req.rid] = (req, now, now + self.timeout_s, num_bytes)

    def ack(self, rid: str):
        """(req, seconds since sent, bytes) for an acked request, or None if unknown."""
        entry = self.entries.pop(rid, None)
        if entry is None:
            return None
        req, sent_at, _, num_bytes = entry
        return req, time.monotonic() - sent_at, num_bytes

    def remove(self, rid: str) -> None:
        self.entries.pop(rid, None)

    def pop_expired(self) -> list[Req]:
        now = time.monotonic()
        expired = [req for req, _, dl, _ in self.entries.values() if dl < now]
        for req in expired:
            del self.entries[req.rid]
        return expired
