"""TransferQueue: requests with reserved pages, waiting for their `kv_batch`."""
from __future__ import annotations

import time
from typing import Optional

from cluster.runtime.schedule_batch import Req


class TransferQueue:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.entries: dict[str, tuple[Req, float]] = {}   # rid -> (req, deadline)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, req: Req) -> None:
        self.entries[req.rid] = (req, time.monotonic() + self.timeout_s)

    def pop(self, rid: str) -> Optional[Req]:
        """The request whose KV arrived, or None if it is not expected (aborted, timed out)."""
        entry = self.entries.pop(rid, None)
        return None if entry is None else entry[0]

    def remove(self, rid: str) -> None:
        self.entries.pop(rid, None)

    def pop_expired(self) -> list[Req]:
        now = time.monotonic()
        expired = [req for req, dl in self.entries.values() if dl < now]
        for req in expired:
            del self.entries[req.rid]
        return expired
