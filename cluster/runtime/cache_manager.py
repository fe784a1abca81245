"""CacheManager: owns a worker's KV pages, which request holds which page, and the prefix cache.

With the prefix cache on, the head of a request's page table may be pages of the radix
tree (`req.num_shared_pages` of them, referenced through `req.cache_node`); the rest are
its own. A finished request gives its whole pages to the tree (`release(keep_kv=True)`),
so the next request with the same prefix extends from them; an aborted or failed one
only drops its references. Cached pages nobody references are evicted, least recently
used first, when an allocation runs short: for scheduling they count as free. A prompt's
whole pages join the tree already when its prefill forward returns (`cache_prefix`), so
requests running at the same time share them.

With a host tier (`engine/host_tier.py`) evicted pages go to host memory instead of away,
and a request whose prefix continues there gets those pages loaded back into fresh device
pages (when `LoadCost` predicts loading beats recomputing): it then starts as if the whole
prefix had been on the device.
"""
from __future__ import annotations

import math

from cluster.engine.kv_cache import pages_for
from cluster.engine.radix_cache import RadixCache
from cluster.runtime.schedule_batch import Req


class CacheManager:
    def __init__(self, page_allocator, page_size: int):
        self.allocator = page_allocator
        self.page_size = page_size
        self.num_pages = page_allocator.num_free_pages   # at start every page is free
        self.tree: RadixCache | None = None
        self.host_tier = None          # HostTier, with the prefix cache only
        self.num_query_tokens = 0      # tokens of requests looked up in the prefix cache
        self.num_hit_tokens = 0        # of those, tokens whose KV came from the cache (either tier)
        self.num_host_hit_tokens = 0   # of those, tokens loaded back from the host tier
        self._host_loads: dict[str, list] = {}  # rid -> tree nodes loaded for it, until released

    def enable_prefix_cache(self, host_tier=None) -> None:
        if self.tree is None:
            self.host_tier = host_tier
            if host_tier is None:
                self.tree = RadixCache(self.allocator, self.page_size)
            else:
                self.tree = RadixCache(self.allocator, self.page_size, host_tier.allocator, host_tier.write,
                                       host_tier.loading, host_tier.cancel_load, host_tier.policy.wants)

    def drop_prefix_cache(self) -> None:
        """Free every cached page (no request may hold any): the pool goes to another role."""
        if self.tree is not None:
            self.tree.evict(self.tree.num_evictable_pages)
            self.tree = self.host_tier = None

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def num_missing_pages(self, req: Req, num_tokens: int) -> int:
        return max(0, self.pages_for(num_tokens) - len(req.page_table))

    @property
    def num_free_pages(self) -> int:
        """Free pages plus cached pages no request references (evicted on demand)."""
        evictable = self.tree.num_evictable_pages if self.tree is not None else 0
        return self.allocator.num_free_pages + evictable

    def can_allocate(self, num_pages: int) -> bool:
        return 0 <= num_pages <= self.num_free_pages

    def can_grow(self, req: Req, num_tokens: int, reserve: int = 0) -> bool:
        return self.can_allocate(self.num_missing_pages(req, num_tokens) + reserve)

    def grow(self, req: Req, num_tokens: int) -> None:
        """Make `req.page_table` cover `num_tokens` positions."""
        missing = self.num_missing_pages(req, num_tokens)
        if missing:
            pages = self.tree.allocate(missing) if self.tree is not None else self.allocator.allocate(missing)
            req.page_table.extend(pages)

    # ---- prefix cache --------------------------------------------------------------
    def match_prefix(self, req: Req) -> int:
        """Start a fresh request on the longest cached prefix of its tokens; -> tokens reused.

        At least the last token is left to compute: its forward gives the next token's logits.
        """
        if self.tree is None or req.page_table or req.kv_len:
            return 0
        if req.sampling.prompt_logprobs and not req.num_output:   # echo: every prompt position's forward is needed
            return 0
        ids, namespace = req.all_ids, kv_namespace(req)
        pages, node = self.tree.match_prefix(ids[:len(ids) - 1], namespace)
        if namespace:                              # block-causal KV: whole blocks only
            while len(pages) % (self.whole_blocks(req) // self.page_size):
                pages, node = pages[:-1], node.parent
        self.tree.lock(node)
        if self.host_tier is not None and not namespace:
            node, loaded = self._load_from_host(node, ids[:len(ids) - 1])
            pages = pages + [n.page for n in loaded]
            if loaded:
                self._host_loads[req.rid] = loaded
                self.num_host_hit_tokens += len(loaded) * self.page_size
        req.cache_node, req.num_shared_pages = node, len(pages)
        req.page_table = list(pages)
        req.kv_len = req.cached_len = len(pages) * self.page_size
        self.num_query_tokens += len(ids)
        self.num_hit_tokens += req.kv_len
        return req.kv_len

    def _load_from_host(self, node, token_ids) -> tuple[object, list[int]]:
        """Load the host-only continuation of locked `node` along `token_ids` into fresh
        device pages, as much as fits and only when the cost model says it pays;
        -> (the deepest locked node, the nodes loaded)."""
        wanted = len(self.tree.match_host(token_ids))
        num = min(wanted, self.num_free_pages)
        if not num or not self.host_tier.cost.should_load(num * self.page_size):
            return node, []
        pages = self.tree.allocate(num)             # may evict to host, and from it
        nodes = self.tree.match_host(token_ids)[:num]
        if len(nodes) < num:                        # the host tier made room from our own tail
            self.allocator.free(pages[len(nodes):])
            pages = pages[:len(nodes)]
        if not nodes:
            return node, []
        self.host_tier.load([n.host_page for n in nodes], pages)
        self.tree.adopt(nodes, pages)
        self.tree.lock(nodes[-1])
        self.tree.unlock(node)
        return nodes[-1], nodes

    def unmatch(self, req: Req) -> None:
        """Undo `match_prefix` of a request that was not scheduled after all."""
        if req.cache_node is not None and req.kv_len == req.cached_len:
            self.num_query_tokens -= req.seq_len
            self.num_hit_tokens -= req.kv_len
            loaded = self._host_loads.pop(req.rid, [])
            self.num_host_hit_tokens -= len(loaded) * self.page_size
            self.release(req, keep_kv=False)
            if loaded:                              # back to host-only: nothing will read those pages
                pages = self.tree.unadopt(loaded)
                self.host_tier.cancel_load(pages)
                self.allocator.free(pages)
            req.kv_len = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    # ---- a prompt's pages join the tree when its prefill ends ------------------------
    def cache_prefix(self, req: Req, num_tokens: int) -> None:
        """The whole pages of `req`'s first `num_tokens` positions, whose forward has returned,
        go to the prefix cache now rather than at finish (SGLang's `cache_unfinished_req`), so
        a request running beside it extends from them; `req` references them until released.

        Only pages the tree does not hold are given: when another request cached the same
        prefix first, ours stay private until release. So `req.page_table` never changes here,
        and a forward in flight, a running batch's page rows or KV being sent still read the
        pages they were planned with."""
        if self.tree is None or req.is_finished or req.kv_len < num_tokens:   # released meanwhile
            return
        unit = self.whole_blocks(req)
        n = min(num_tokens, len(req.page_table) * self.page_size) // unit * unit // self.page_size
        if n <= req.num_shared_pages:
            return
        ids, namespace = req.all_ids[:n * self.page_size], kv_namespace(req)
        held, _ = self.tree.match_prefix(ids, namespace)
        if held != req.page_table[:len(held)]:
            return
        node, _ = self.tree.insert(ids, req.page_table[:n], namespace)   # new nodes only: nothing freed
        self.tree.lock(node)
        if req.cache_node is not None:
            self.tree.unlock(req.cache_node)
        req.cache_node, req.num_shared_pages = node, n

    # ---- n > 1: fork one prefilled prompt into n sequences --------------------------
    def fork(self, parent: Req, children: list[Req], num_tokens: int) -> list[tuple[int, int]]:
        """Give `children` the KV of the parent's first `num_tokens` positions without
        computing or transferring it again; each child then has `kv_len == num_tokens`.

        Whole pages are shared: they go to the radix tree (its reference counts are the
        sharing), the parent and each child lock them, and they go back to the pool when the
        last of them is released. The partial page after them is written by each one's next
        token, so it is never shared (copy on write, done at once: each child gets a fresh
        page). Without a prefix cache the children copy every page (still no second prefill
        or transfer). All or nothing: MemoryError when the pages do not fit.
        -> (src, dst) page copies the caller runs on the KV pools
        (`kv_transfer.page_copy.copy_pages`) before any child's forward.
        """
        if not 0 < num_tokens <= parent.kv_len - parent.num_pending:
            raise ValueError(f"fork of {parent.rid}: {num_tokens} tokens, {parent.kv_len} written")
        size = self.page_size
        num_whole = num_tokens // size if self.tree is not None else 0
        own = self.pages_for(num_tokens) - num_whole             # pages each child copies
        if not self.can_allocate(own * len(children)):
            raise MemoryError(f"fork of {parent.rid}: {own * len(children)} pages needed, "
                              f"{self.num_free_pages} free")
        node, shared = None, []
        if num_whole > parent.num_shared_pages:                  # the parent's own pages become the tree's
            ids = parent.all_ids[:num_whole * size]
            node, _ = self.tree.insert(ids, parent.page_table[:num_whole])
            shared, _ = self.tree.match_prefix(ids)
            self.tree.lock(node)
            if parent.cache_node is not None:
                self.tree.unlock(parent.cache_node)
            parent.page_table[:num_whole] = shared               # a duplicate page was given back
            parent.cache_node, parent.num_shared_pages = node, num_whole
        elif num_whole:
            node, shared = parent.cache_node, parent.page_table[:num_whole]
            while node.depth > num_whole:                        # the parent's node is deeper
                node = node.parent
        copies: list[tuple[int, int]] = []
        tail = parent.page_table[num_whole:num_whole + own]
        for child in children:
            mine = self.tree.allocate(own) if self.tree is not None else self.allocator.allocate(own)
            copies.extend(zip(tail, mine))
            if node is not None:
                self.tree.lock(node)
            child.page_table = list(shared) + mine
            child.num_shared_pages, child.cache_node = num_whole, node
            child.kv_len, child.cached_len = num_tokens, 0
        return copies

    # ---- release -------------------------------------------------------------------
    def release(self, req: Req, keep_kv: bool = True) -> None:
        """Give back the request's pages; with `keep_kv`, its whole pages of written KV go to
        the prefix cache: positions whose token is known and whose forward has returned
        (not those of a launched forward still pending, which may yet fail, and which a tree
        page must never be written by). `kv_len - num_pending` counts them when each pending
        forward is a decode step (one position): a request whose prefill is still in flight
        is released without `keep_kv` (DecodeManager's retraction under overlap)."""
        pages, shared = req.page_table, req.num_shared_pages
        req.page_table, req.num_shared_pages, req.cached_len = [], 0, 0
        self._host_loads.pop(req.rid, None)
        node, req.cache_node = req.cache_node, None
        if self.tree is None:
            if pages:
                self.allocator.free(pages)
            return
        kept = shared
        if keep_kv:
            unit = self.whole_blocks(req)
            n = min(req.kv_len - req.num_pending, req.seq_len) // unit * unit // self.page_size
            ids = req.all_ids[:n * self.page_size]
            self.tree.insert(ids, pages[:n], kv_namespace(req))   # takes pages[:n]: new nodes, or freed as duplicates
            kept = max(n, shared)
        if len(pages) > kept:
            self.allocator.free(pages[kept:])
        if node is not None:
            self.tree.unlock(node)

    def whole_blocks(self, req: Req) -> int:
        """The granule of `req`'s cacheable KV: a page, or with block-causal KV (whose positions
        depend on their whole block) the least common multiple of page and block."""
        return math.lcm(self.page_size, kv_namespace(req) or 1)

    def free(self, req: Req) -> None:
        self.release(req, keep_kv=False)

    def seal_loads(self, forward_iter: int) -> None:
        """Host-tier loads queued so far run right before forward `forward_iter`."""
        if self.host_tier is not None:
            self.host_tier.seal(forward_iter)

    def tier_gauges(self) -> dict:
        """Hit tokens by tier; with a host tier, its bytes moved and its usage."""
        out = {"prefix_cache_hit_tokens_total": {"device": self.num_hit_tokens - self.num_host_hit_tokens,
                                                 "host": self.num_host_hit_tokens}}
        tier = self.host_tier
        if tier is not None:
            out["host_tier_bytes_total"] = {"to_host": tier.bytes_to_host, "to_device": tier.bytes_to_device}
            out["host_tier_usage"] = tier.usage
        return out

    @property
    def token_usage(self) -> float:
        """Pages held by live requests over the pool (unreferenced cached pages count as free)."""
        return 1.0 - self.num_free_pages / max(1, self.num_pages)


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


def kv_namespace(req: Req) -> int:
    """Where `req`'s KV lives in the prefix cache: 0 with causal attention (autoregressive and
    causal DLLM prompts share it), the block size for block-causal KV, which differs for the
    same tokens."""
    return req.dllm_attn_block if req.dllm_attn_block > 1 else 0
