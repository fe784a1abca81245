"""CacheManager: owns a worker's KV pages and which request holds which page."""
from __future__ import annotations

from cluster.runtime.schedule_batch import Req


class CacheManager:
    def __init__(self, page_allocator, page_size: int):
        self.allocator = page_allocator
        self.page_size = page_size
        self.num_pages = page_allocator.num_free_pages   # at start every page is free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_missing_pages(self, req: Req, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(req.page_table))

    def can_grow(self, req: Req, num_tokens: int, reserve: int = 0) -> bool:
        return self.allocator.can_allocate(self.num_missing_pages(req, num_tokens) + reserve)

    def grow(self, req: Req, num_tokens: int) -> None:
        """Make `req.page_table` cover `num_tokens` positions."""
        missing = self.num_missing_pages(req, num_tokens)
        if missing:
            req.page_table.extend(self.allocator.allocate(missing))

    def free(self, req: Req) -> None:
        if req.page_table:
            self.allocator.free(req.page_table)
            req.page_table = []

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages

    @property
    def token_usage(self) -> float:
        """Pages held by live requests over the pool."""
        return 1.0 - self.allocator.num_free_pages / max(1, self.num_pages)


class SlotAllocator:
    """Future-token slots (overlap): one per live request, recycled on finish."""

    def __init__(self, num_slots: int):
        self.free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_slots)

    def allocate(self) -> int:
        if not self.free_slots:
            raise RuntimeError("out of future-token slots")
        return self.free_slots.pop()

    def free(self, slot: int) -> None:
        if slot >= 0:
            self.free_slots.append(slot)
