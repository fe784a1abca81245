"""DecodeManager: the running set, and retraction when pages run out."""
from __future__ import annotations

from typing import Callable, Optional

from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch


class DecodeManager:
    def __init__(self, cache: CacheManager, on_retract: Callable[[Req], None],
                 on_fail: Callable[[Req, str], None]):
        self.cache = cache
        self.running: list[Req] = []
        self.on_retract = on_retract    # requeue the request to be prefilled again
        self.on_fail = on_fail          # finish the request with an error
        self.num_retracted_total = 0

    def add(self, req: Req) -> None:
        self.running.append(req)

    def remove(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)

    def __len__(self) -> int:
        return len(self.running)

    @property
    def num_tokens(self) -> int:
        return sum(r.kv_len for r in self.running)

    def schedule(self) -> Optional[ScheduleBatch]:
        """One new token per running request; retract the newest while pages are short.

        The token fed at position `kv_len` is known, or (overlap) is the request's last
        sampled token, which the forward side reads from its future slot.
        """
        self.running = [r for r in self.running if not r.is_finished]
        while self.running:
            missing = sum(self.cache.num_missing_pages(r, r.kv_len + 1) for r in self.running)
            if self.cache.can_allocate(missing):
                break
            victim = self.running.pop()          # newest request
            if not self.running:
                # alone and still short: re-prefilling would need even more pages
                self.cache.free(victim)
                self.on_fail(victim, f"KV cache exhausted: {victim.seq_len} tokens do not fit the page pool")
                return None
            self.cache.release(victim)           # its KV stays cached until the pages are needed
            victim.kv_len = 0
            self.num_retracted_total += 1
            self.on_retract(victim)
        if not self.running:
            return None
        for r in self.running:
            self.cache.grow(r, r.kv_len + 1)
        batch = ScheduleBatch(list(self.running), ForwardMode.DECODE,
                              prefix_lens=[r.kv_len for r in self.running])
        for r in self.running:
            r.kv_len += 1
            r.num_pending += 1
        return batch
