"""PrefixIndex: the router's approximate picture of which prefixes each worker has cached.

Built only from what the router itself dispatched (as SGLang's router does, no worker
events): a prompt sent to a worker is assumed cached there, and so is prompt + output
on a worker that keeps finished requests (decode, unified). A prefix is a chain of
whole pages of the worker's `page_size`, each keyed by the hash of the chain so far, so
two prompts that share their first k pages share k keys; that is a radix tree over pages
flattened into one dict. Each worker's dict is bounded by its pool (`num_pages`) and
forgets least recently used pages first, as the worker's own LRU eviction would.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence


class WorkerPrefixes:
    def __init__(self, page_size: int, num_pages: int):
        self.page_size = max(1, page_size)
        self.num_pages = max(1, num_pages)
        self.pages: OrderedDict[int, None] = OrderedDict()   # chain hash -> (LRU order)

    def _chain(self, token_ids: Sequence[int]):
        h, p = 0, self.page_size
        for i in range(len(token_ids) // p):
            h = hash((h, tuple(token_ids[i * p:(i + 1) * p])))
            yield h

    def match(self, token_ids: Sequence[int]) -> int:
        """Leading tokens of `token_ids` believed cached (whole pages)."""
        n = 0
        for h in self._chain(token_ids):
            if h not in self.pages:
                break
            self.pages.move_to_end(h)
            n += 1
        return n * self.page_size

    def insert(self, token_ids: Sequence[int]) -> None:
        for h in self._chain(token_ids):
            self.pages[h] = None
            self.pages.move_to_end(h)
        while len(self.pages) > self.num_pages:
            self.pages.popitem(last=False)


class PrefixIndex:
    def __init__(self):
        self.workers: dict[str, WorkerPrefixes] = {}

    def add_worker(self, worker_id: str, page_size: int, num_pages: int) -> None:
        """A (re)registered worker starts with an empty cache."""
        self.workers[worker_id] = WorkerPrefixes(page_size, num_pages)

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    def match(self, worker_id: str, token_ids: Sequence[int]) -> int:
        w = self.workers.get(worker_id)
        return w.match(token_ids) if w is not None else 0

    def insert(self, worker_id: str, token_ids: Sequence[int]) -> None:
        w = self.workers.get(worker_id)
        if w is not None:
            w.insert(token_ids)
