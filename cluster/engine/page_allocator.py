"""PageAllocator: which KV pages are free. Pure Python, no torch, no device.

Pages are handed out lowest id first, so a fresh allocator gives consecutive pages
(which keeps a request's KV contiguous in memory as long as nobody else interleaves).
"""
from __future__ import annotations

import heapq


class PageAllocator:
    def __init__(self, num_pages: int):
        assert num_pages > 0
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages))   # a heap
        self._is_free = [True] * num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"cannot allocate {n} pages: {len(self._free)} free of {self.num_pages}")
        pages = [heapq.heappop(self._free) for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} out of range [0, {self.num_pages})")
            if self._is_free[p]:
                raise ValueError(f"double free of page {p}")
            self._is_free[p] = True
            heapq.heappush(self._free, p)

    def check_integrity(self, held: list[list[int]] | None = None) -> None:
        """Raise if the free list is inconsistent; with `held` (every live page table), also
        if a page is held twice, held while free (double use), or neither held nor free (leak)."""
        if len(set(self._free)) != len(self._free):
            raise AssertionError("a page is in the free list twice")
        if sum(self._is_free) != len(self._free) or not all(self._is_free[p] for p in self._free):
            raise AssertionError("free list and free flags disagree")
        if held is None:
            return
        owned = [p for pages in held for p in pages]
        if len(set(owned)) != len(owned):
            raise AssertionError("a page is held by two owners")
        if any(self._is_free[p] for p in owned):
            raise AssertionError("a held page is also free")
        if len(owned) + len(self._free) != self.num_pages:
            raise AssertionError(f"leak: {self.num_pages - len(owned) - len(self._free)} pages neither held nor free")
