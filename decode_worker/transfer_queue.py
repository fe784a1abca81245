"""TransferQueue: requests with reserved pages, waiting for their `kv_batch`
(at most `timeouts.decode_ready + timeouts.kv_transfer`)."""
from __future__ import annotations

from cluster.runtime.deadline_queue import DeadlineQueue
from cluster.runtime.schedule_batch import Req


class TransferQueue(DeadlineQueue[Req]):
    def add(self, req: Req) -> None:
        self.put(req.rid, req)

    def remove(self, rid: str) -> None:
        self.pop(rid)
