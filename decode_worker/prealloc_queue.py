"""PreallocQueue: decode requests waiting for pages before saying `decode_ready`.

A request is let in only when the pages for its whole KV (prompt, plus tokens so far
when it is resumed) and its first decode step fit, leaving one page per running
request for their next step.
"""
from __future__ import annotations

from collections import deque

from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import Req


class PreallocQueue:
    def __init__(self, cache: CacheManager):
        self.cache = cache
        self.waiting: deque[Req] = deque()

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, req: Req, front: bool = False) -> None:
        (self.waiting.appendleft if front else self.waiting.append)(req)

    def remove(self, rid: str) -> None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return

    def pop_reserved(self, num_running: int, max_running: int, no_reuse: frozenset = frozenset()) -> list[Req]:
        """Reserve pages for queued requests in order; stop at the first that does not fit.

        Decode-side reuse: a request starts on the longest prefix this worker's cache holds
        (`req.cached_len`), so only the rest has to arrive; not those in `no_reuse`."""
        reserved: list[Req] = []
        while self.waiting and num_running + len(reserved) < max_running:
            req = self.waiting[0]
            if req.num_pending:                  # a retracted request's last token is still in flight
                break
            if req.rid not in no_reuse:
                self.cache.match_prefix(req)
            kv_len = req.seq_len + 1             # received KV plus the first decode step
            if not self.cache.can_grow(req, kv_len, reserve=num_running + len(reserved)):
                self.cache.unmatch(req)
                break
            self.cache.grow(req, kv_len)
            reserved.append(self.waiting.popleft())
        return reserved
