"""DeadlineQueue: entries by rid, each due `timeout_s` after it was added.

The disaggregated queues that wait on the other side (prefill's bootstrap and inflight
queues, decode's transfer queue) are this plus their own meaning; `pop_expired` is how each
of them finds what waited too long (the caller fails those requests with a reason).
"""
from __future__ import annotations

import time
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class DeadlineQueue(Generic[T]):
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.entries: dict[str, tuple[T, float]] = {}    # rid -> (value, deadline)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, rid: str) -> bool:
        return rid in self.entries

    def put(self, rid: str, value: T) -> None:
        self.entries[rid] = (value, time.monotonic() + self.timeout_s)

    def pop(self, rid: str) -> Optional[T]:
        """The entry's value (removed), or None if `rid` is not waiting."""
        entry = self.entries.pop(rid, None)
        return None if entry is None else entry[0]

    def pop_expired(self) -> list[T]:
        now = time.monotonic()
        expired = [rid for rid, (_, deadline) in self.entries.items() if deadline < now]
        return [self.entries.pop(rid)[0] for rid in expired]
