"""RadixCache: page-granular prefix cache over the KV page pool. Pure Python, no torch.

Every edge is exactly one page of token ids (`page_size` tokens), so a node owns one page
and a node never splits: a prefix shorter than a page is not worth sharing, and a
partial page would be written by its owner while others read it. A page is, at any
time, free in the allocator, held by one request alone, or owned by the tree.

Invariants:
- `lock(node)` adds one reference to every node from `node` up to the root, so a node
  with `ref_count == 0` has only unreferenced descendants: all of them are evictable,
  leaves first.
- Eviction frees the least recently used unreferenced leaf, again and again; `match`
  and `insert` touch the whole path with one clock value, so a parent is never older
  than its children.
- `insert` takes ownership of the pages it is given: each one becomes a new node's
  page, or is given back to the allocator when the tree already holds that prefix.
"""
from __future__ import annotations

import heapq
from typing import Optional, Sequence

from cluster.engine.page_allocator import PageAllocator


class RadixNode:
    __slots__ = ("key", "page", "parent", "children", "ref_count", "last_used")

    def __init__(self, key: tuple, page: int, parent: Optional["RadixNode"]):
        self.key = key                 # the page's token ids
        self.page = page               # -1 for the root
        self.parent = parent
        self.children: dict[tuple, RadixNode] = {}
        self.ref_count = 0
        self.last_used = 0

    @property
    def depth(self) -> int:
        """Pages from the root to this node, itself included."""
        n, node = 0, self
        while node.parent is not None:
            n, node = n + 1, node.parent
        return n

    def __lt__(self, other: "RadixNode") -> bool:   # heap order: oldest first
        return self.last_used < other.last_used


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int):
        assert page_size >= 1
        self.allocator = allocator
        self.page_size = page_size
        self.root = RadixNode((), -1, None)
        self.root.ref_count = 1        # never evicted
        self.num_cached_pages = 0      # nodes below the root
        self.num_evictable_pages = 0   # nodes with ref_count == 0
        self._clock = 0

    def _keys(self, token_ids: Sequence[int], num_pages: int):
        p = self.page_size
        return (tuple(token_ids[i * p:(i + 1) * p]) for i in range(num_pages))

    def _touch(self, node: RadixNode) -> None:
        self._clock += 1
        while node is not None:
            node.last_used = self._clock
            node = node.parent

    # ---- lookup ------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int]) -> tuple[list[int], RadixNode]:
        """The pages of the longest cached whole-page prefix of `token_ids`, and its last node."""
        node, pages = self.root, []
        for key in self._keys(token_ids, len(token_ids) // self.page_size):
            child = node.children.get(key)
            if child is None:
                break
            node = child
            pages.append(node.page)
        self._touch(node)
        return pages, node

    # ---- references --------------------------------------------------------------
    def lock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.ref_count == 0:
                self.num_evictable_pages -= 1
            node.ref_count += 1
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        while node is not self.root:
            if node.ref_count <= 0:
                raise AssertionError(f"unlock of unreferenced page {node.page}")
            node.ref_count -= 1
            if node.ref_count == 0:
                self.num_evictable_pages += 1
            node = node.parent

    # ---- insertion ---------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], pages: Sequence[int]) -> tuple[RadixNode, int]:
        """Cache the whole pages of `token_ids` (KV in `pages`); -> (last node, pages added).

        `pages[i]` holds tokens `[i * page_size, (i + 1) * page_size)`; pages beyond the
        whole-page part of `token_ids` are not the tree's business. A given page the tree
        already has a different page for is freed (two requests computed the same prefix).
        """
        num = min(len(token_ids) // self.page_size, len(pages))
        node, added, duplicates = self.root, 0, []
        for key, page in zip(self._keys(token_ids, num), pages):
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key, page, node)
                node.children[key] = child
                added += 1
            elif child.page != page:
                duplicates.append(page)
            node = child
        self.num_cached_pages += added
        self.num_evictable_pages += added
        if duplicates:
            self.allocator.free(duplicates)
        self._touch(node)
        return node, added

    # ---- eviction ----------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` pages of unreferenced nodes, least recently used leaf first."""
        heap = [n for n in self._nodes() if not n.children and n.ref_count == 0]
        heapq.heapify(heap)
        freed: list[int] = []
        while heap and len(freed) < num_pages:
            node = heapq.heappop(heap)
            parent = node.parent
            del parent.children[node.key]
            freed.append(node.page)
            if parent is not self.root and not parent.children and parent.ref_count == 0:
                heapq.heappush(heap, parent)
        if freed:
            self.allocator.free(freed)
        self.num_cached_pages -= len(freed)
        self.num_evictable_pages -= len(freed)
        return len(freed)

    def allocate(self, num_pages: int) -> list[int]:
        """Pages from the allocator, evicting unreferenced cached pages when it runs short."""
        short = num_pages - self.allocator.num_free_pages
        if short > 0:
            self.evict(short)
        return self.allocator.allocate(num_pages)

    # ---- introspection -----------------------------------------------------------
    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def pages(self) -> list[int]:
        return [n.page for n in self._nodes()]

    def check_integrity(self) -> None:
        """Raise if a counter or a reference disagrees with the tree."""
        nodes = list(self._nodes())
        if len(nodes) != self.num_cached_pages:
            raise AssertionError(f"{len(nodes)} nodes, counter says {self.num_cached_pages}")
        if sum(n.ref_count == 0 for n in nodes) != self.num_evictable_pages:
            raise AssertionError("evictable counter disagrees with ref counts")
        for n in nodes:
            if n.ref_count < sum(c.ref_count for c in n.children.values()):
                raise AssertionError(f"page {n.page} has fewer references than its children")
            if n.last_used < max((c.last_used for c in n.children.values()), default=0):
                raise AssertionError(f"page {n.page} is older than a child")
