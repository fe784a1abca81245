"""RadixCache: page-granular prefix cache over the KV page pool, and optionally a host tier.
Pure Python, no torch.

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

With a host tier (`host_allocator` + `write_back`), a node's KV is on the device (`page`),
in host memory (`host_page`), or both; -1 where it is not. The device-resident nodes are
closed under taking the parent, so a request's matched device pages are a prefix and only
device nodes are ever referenced. Evicting device pages writes those the tier's policy wants
(`should_write`; `reused`: the node was part of a match) to host pages first, unless they have
one, those nodes staying in the tree host-only; host pages are evicted least recently used too,
once per device eviction (1/32 of the tier ahead): a copy on both tiers loses its host copy, a
host-only leaf goes. A device page evicted while a host load into it is still queued (its request
was aborted) has that load cancelled (`cancel_loads`) before the page goes back to the allocator.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Collection, Optional, Sequence

from cluster.engine.page_allocator import PageAllocator


class RadixNode:
    __slots__ = ("key", "page", "host_page", "parent", "children", "ref_count", "last_used", "reused")

    def __init__(self, key: tuple, page: int, parent: Optional["RadixNode"]):
        self.key = key                 # the page's token ids
        self.page = page               # device page; -1 for the root and host-only nodes
        self.host_page = -1            # host-tier page; -1 when not there
        self.parent = parent
        self.children: dict[tuple, RadixNode] = {}
        self.ref_count, self.last_used, self.reused = 0, 0, False

    @property
    def depth(self) -> int:
        """Pages from the root to this node, itself included."""
        n, node = 0, self
        while node.parent is not None:
            n, node = n + 1, node.parent
        return n

    def __lt__(self, other: "RadixNode") -> bool:   # heap order: oldest first
        return self.last_used < other.last_used


WriteBack = Callable[[list, list], None]     # (device pages, host pages): queue their copy
CancelLoads = Callable[[list], None]         # (device pages): drop the host loads into them not run yet


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int,
                 host_allocator: Optional[PageAllocator] = None, write_back: Optional[WriteBack] = None,
                 host_pinned: Collection[int] = (), cancel_loads: Optional[CancelLoads] = None,
                 should_write: Optional[Callable[[RadixNode], bool]] = None):
        assert page_size >= 1 and (host_allocator is None) == (write_back is None)
        self.allocator, self.page_size = allocator, page_size
        self.host_allocator, self.write_back = host_allocator, write_back
        self.host_pinned = host_pinned     # host pages a queued load still reads: not evicted
        self.cancel_loads = cancel_loads   # an evicted device page's queued load must not land later
        self.should_write = should_write or (lambda node: True)   # the host tier's write policy
        self.root = RadixNode((), -1, None)
        self.root.ref_count = 1        # never evicted
        self.num_cached_pages = 0      # device-resident nodes below the root
        self.num_evictable_pages = 0   # of those, nodes with ref_count == 0
        self.num_host_pages = 0        # nodes with a host page
        self._clock = 0

    def _keys(self, token_ids: Sequence[int], num_pages: int, namespace: int = 0):
        """Page keys; a `namespace` > 0 tags the first (KV of the same tokens computed another
        way, e.g. block-causal, lives in its own subtree)."""
        p = self.page_size
        keys = (tuple(token_ids[i * p:(i + 1) * p]) for i in range(num_pages))
        if namespace and num_pages:
            keys = itertools.chain([(-namespace, *next(keys))], keys)
        return keys

    def _touch(self, node: RadixNode) -> None:
        self._clock += 1
        while node is not None:
            node.last_used = self._clock
            node = node.parent

    # ---- lookup ------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], namespace: int = 0) -> tuple[list[int], RadixNode]:
        """The pages of the longest cached whole-page prefix of `token_ids`, and its last node."""
        node, pages = self.root, []
        for key in self._keys(token_ids, len(token_ids) // self.page_size, namespace):
            child = node.children.get(key)
            if child is None or child.page < 0:
                break
            node = child
            node.reused = True
            pages.append(node.page)
        self._touch(node)
        return pages, node

    def match_host(self, token_ids: Sequence[int], namespace: int = 0) -> list[RadixNode]:
        """The host-only nodes that continue `match_prefix(token_ids)` along `token_ids`:
        KV the host tier holds beyond the device hit, parent first."""
        node, out = self.root, []
        for key in self._keys(token_ids, len(token_ids) // self.page_size, namespace):
            node = node.children.get(key)
            if node is None or (node.page < 0 and node.host_page < 0):
                break
            if node.page < 0:
                node.reused = True
                out.append(node)
        if out:
            self._touch(out[-1])               # most recent now: not what the host tier evicts next
        return out

    def adopt(self, nodes: Sequence[RadixNode], pages: Sequence[int]) -> None:
        """Host-only `nodes` (a path, parent first, continuing the device nodes) now also
        have device `pages`, which the caller fills from their host pages."""
        for node, page in zip(nodes, pages, strict=True):
            assert node.page < 0 and (node.parent is self.root or node.parent.page >= 0)
            node.page = page
        self.num_cached_pages += len(nodes)
        self.num_evictable_pages += len(nodes)
        if nodes:
            self._touch(nodes[-1])

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

    def unadopt(self, nodes: Sequence[RadixNode]) -> list[int]:
        """Undo `adopt` where nobody references the pages yet (the request that loaded them was not
        scheduled): deepest first, back to host-only; -> the device pages given up (caller frees)."""
        pages = []
        for node in reversed(nodes):
            if node.ref_count or any(c.page >= 0 for c in node.children.values()):
                break
            pages.append(node.page)
            node.page = -1
        self.num_cached_pages -= len(pages)
        self.num_evictable_pages -= len(pages)
        return pages

    # ---- insertion ---------------------------------------------------------------
    def insert(self, token_ids: Sequence[int], pages: Sequence[int], namespace: int = 0) -> tuple[RadixNode, int]:
        """Cache the whole pages of `token_ids` (KV in `pages`); -> (last node, pages added).
        `pages[i]` holds tokens `[i * page_size, (i + 1) * page_size)`; pages beyond the whole-page
        part of `token_ids` are not the tree's business. A given page the tree already has a
        different page for is freed (two requests computed the same prefix)."""
        num = min(len(token_ids) // self.page_size, len(pages))
        node, added, duplicates = self.root, 0, []
        for key, page in zip(self._keys(token_ids, num, namespace), pages):
            child = node.children.get(key)
            if child is None:
                child = RadixNode(key, page, node)
                node.children[key] = child
                added += 1
            elif child.page < 0:               # host-only: the device has it again
                child.page = page
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
        """Free up to `num_pages` device pages of unreferenced nodes, least recently used
        leaf (of the device nodes) first; with a host tier their KV goes there first (those
        `should_write` wants), room made there by one host eviction for all of them."""
        heap = [n for n in self._nodes(device_only=True) if n.ref_count == 0
                and not any(c.page >= 0 for c in n.children.values())]
        heapq.heapify(heap)
        victims, chosen = [], set()
        while heap and len(victims) < num_pages:
            node = heapq.heappop(heap)
            victims.append(node)
            chosen.add(node)
            parent = node.parent
            if parent is not self.root and parent.ref_count == 0 \
                    and all(c.page < 0 or c in chosen for c in parent.children.values()):
                heapq.heappush(heap, parent)
        to_host = []
        if self.host_allocator is not None:
            to_host = [n for n in victims if n.host_page < 0 and self.should_write(n)]
            short = len(to_host) - self.host_allocator.num_free_pages
            if short > 0:   # NOTE: once for all and 1/32 of the tier ahead: each call walks the tree
                self.evict_host(max(short, self.host_allocator.num_pages // 32))
            to_host = to_host[max(0, len(to_host) - self.host_allocator.num_free_pages):]   # parents last: kept
            written, hosts = [n.page for n in to_host], self.host_allocator.allocate(len(to_host))
            for node, host in zip(to_host, hosts):
                node.host_page = host
            self.num_host_pages += len(hosts)
        freed = [n.page for n in victims]
        for node in victims:
            node.page = -1
            if node.host_page < 0:             # nowhere else: the node goes (its subtree is host-only)
                self._drop(node)
        if to_host:
            self.write_back(written, hosts)
        if freed and self.cancel_loads is not None:
            self.cancel_loads(freed)           # NOTE: before the pages can be allocated again
        self.allocator.free(freed)
        self.num_cached_pages -= len(freed)
        self.num_evictable_pages -= len(freed)
        return len(freed)

    def _drop(self, node: RadixNode) -> None:
        """Remove a node that has no device page, and its (host-only) subtree."""
        del node.parent.children[node.key]
        stack, hosts = [node], []
        while stack:
            n = stack.pop()
            assert n.page < 0 and n.ref_count == 0
            if n.host_page >= 0:
                hosts.append(n.host_page)
            stack.extend(n.children.values())
        if hosts:
            self.host_allocator.free(hosts)
            self.num_host_pages -= len(hosts)

    def evict_host(self, num_pages: int) -> int:
        """Free up to `num_pages` host pages, least recently used first: a node on both tiers
        drops its host copy, a host-only leaf leaves the tree."""
        pinned = self.host_pinned
        heap = [n for n in self._nodes() if n.host_page >= 0 and n.host_page not in pinned
                and (n.page >= 0 or not n.children)]
        heapq.heapify(heap)
        freed = []
        while heap and len(freed) < num_pages:
            node = heapq.heappop(heap)
            freed.append(node.host_page)
            node.host_page = -1
            if node.page < 0:
                parent = node.parent
                del parent.children[node.key]
                if parent.page < 0 and parent.host_page >= 0 and not parent.children \
                        and parent.host_page not in pinned:
                    heapq.heappush(heap, parent)
        self.host_allocator.free(freed)
        self.num_host_pages -= len(freed)
        return len(freed)

    def allocate(self, num_pages: int) -> list[int]:
        """Pages from the allocator, evicting unreferenced cached pages when it runs short."""
        short = num_pages - self.allocator.num_free_pages
        if short > 0:
            self.evict(short)
        return self.allocator.allocate(num_pages)

    # ---- introspection -----------------------------------------------------------
    def _nodes(self, device_only: bool = False):
        """Every node; with `device_only` those with a device page (closed under the parent, so
        host-only subtrees are not walked)."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if device_only and node.page < 0:
                continue
            yield node
            stack.extend(node.children.values())

    def pages(self) -> list[int]:
        """Device pages of the tree."""
        return [n.page for n in self._nodes(device_only=True)]

    def host_pages(self) -> list[int]:
        return [n.host_page for n in self._nodes() if n.host_page >= 0]

    def check_integrity(self) -> None:
        """Raise if a counter or a reference disagrees with the tree."""
        nodes = list(self._nodes())
        device = [n for n in nodes if n.page >= 0]
        if len(device) != self.num_cached_pages:
            raise AssertionError(f"{len(device)} device nodes, counter says {self.num_cached_pages}")
        if sum(n.ref_count == 0 for n in device) != self.num_evictable_pages:
            raise AssertionError("evictable counter disagrees with ref counts")
        if sum(n.host_page >= 0 for n in nodes) != self.num_host_pages:
            raise AssertionError("host page counter disagrees with the tree")
        for n in nodes:
            if n.page < 0 and n.host_page < 0:
                raise AssertionError("a node with its KV nowhere")
            if n.page >= 0 and n.parent is not self.root and n.parent.page < 0:
                raise AssertionError(f"device page {n.page} under a host-only node")
            if n.page < 0 and n.ref_count:
                raise AssertionError(f"host page {n.host_page} is referenced")
            if n.ref_count < sum(c.ref_count for c in n.children.values()):
                raise AssertionError(f"page {n.page} has fewer references than its children")
            if n.last_used < max((c.last_used for c in n.children.values()), default=0):
                raise AssertionError(f"page {n.page} is older than a child")
