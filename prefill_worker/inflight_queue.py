"""InflightQueue: prefilled requests whose KV was sent, until decode acks it
(at most `timeouts.kv_transfer`). The transfer time it reports (`kv_transfer_seconds`) runs
from the first byte leaving, the first layer's kv_layers message with layer-wise streaming,
to the kv_ack."""
from __future__ import annotations

import time
from typing import Optional

from cluster.runtime.deadline_queue import DeadlineQueue
from cluster.runtime.schedule_batch import Req


class InflightQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.sent: DeadlineQueue[tuple[Req, float, int]] = DeadlineQueue(timeout_s)   # (req, sent_at, bytes)

    def __len__(self) -> int:
        return len(self.sent)

    def add(self, req: Req, num_bytes: int, sent_at: Optional[float] = None) -> None:
        """`sent_at`: time.monotonic() when its first bytes left (default: now)."""
        self.sent.put(req.rid, (req, time.monotonic() if sent_at is None else sent_at, num_bytes))

    def ack(self, rid: str) -> Optional[tuple[Req, float, int]]:
        """(req, seconds since sent, bytes) for an acked request, or None if unknown."""
        entry = self.sent.pop(rid)
        if entry is None:
            return None
        req, sent_at, num_bytes = entry
        return req, time.monotonic() - sent_at, num_bytes

    def remove(self, rid: str) -> None:
        self.sent.pop(rid)

    def pop_expired(self) -> list[Req]:
        return [req for req, _, _ in self.sent.pop_expired()]
