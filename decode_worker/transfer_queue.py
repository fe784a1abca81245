"""TransferQueue: requests with reserved pages, waiting for their `kv_batch`
(at most `timeouts.decode_ready + timeouts.kv_transfer`)."""
from __future__ import annotations

from typing import Optional

from cluster.runtime.deadline_queue import DeadlineQueue
from cluster.runtime.schedule_batch import Req


class TransferQueue(DeadlineQueue[Req]):
    def add(self, req: Req) -> None:
        self.put(req.rid, req)

    def peek(self, rid: str) -> Optional[Req]:
        entry = self.entries.get(rid)
        return None if entry is None else entry[0]

    def remove(self, rid: str) -> None:
        self.pop(rid)
