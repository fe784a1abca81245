"""PrefillManager: the waiting queue and the token-budget adder that forms prefill batches."""
from __future__ import annotations

from collections import deque
from typing import Optional

from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.prefix_sharing import PrefixSharing
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch


class PrefillManager:
    def __init__(self, cache: CacheManager, max_prefill_tokens: int, max_running_requests: int):
        self.cache = cache
        self.max_prefill_tokens = max_prefill_tokens
        self.max_running_requests = max_running_requests
        self.waiting: deque[Req] = deque()
        self.sharing = PrefixSharing(cache.page_size)

    def add(self, req: Req, front: bool = False) -> None:
        (self.waiting.appendleft if front else self.waiting.append)(req)

    def remove(self, rid: str) -> Optional[Req]:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return req
        return None

    def __len__(self) -> int:
        return len(self.waiting)

    @property
    def num_tokens(self) -> int:
        """Tokens the waiting requests still have to prefill (before any prefix-cache hit)."""
        return sum(r.seq_len - r.kv_len for r in list(self.waiting))   # NOTE: a copy: the heartbeat reads it

    def schedule(self, num_running: int, reserve_pages: int = 0,
                 budget: Optional[int] = None) -> Optional[ScheduleBatch]:
        """Take waiting requests (whole, or the first one chunked) within the token budget.

        A request's remaining tokens are `all_ids[kv_len:]` (prompt, plus output when it
        is re-prefilled after retraction or decode failure); a fresh one first takes the
        longest prefix the prefix cache holds. Only the chunk that reaches
        the end of the sequence samples. `reserve_pages` keeps room for running decodes;
        `budget` (at most `max_prefill_tokens`) caps the new tokens, e.g. a decode step's chunk.
        With the prefix cache, a fresh request whose next pages a request of this
        batch or of the forward in flight computes waits a batch (prefix_sharing.py).
        """
        budget = self.max_prefill_tokens if budget is None else min(budget, self.max_prefill_tokens)
        num_hit_tokens, num_held = 0, 0
        share = self.cache.tree is not None
        chosen: set[int] = set()             # keys of the pages this batch computes
        reqs, extend_lens, prefix_lens, is_last_chunk = [], [], [], []
        for req in list(self.waiting):
            if budget <= 0 or num_running + len(reqs) >= self.max_running_requests:
                break
            if req.num_pending:      # a result for it is still in flight
                continue
            hit = self.cache.match_prefix(req)   # a fresh request extends from its cached prefix
            fresh = req.cache_node is not None and req.kv_len == hit   # matched now (an echo never is)
            if share and fresh and self.sharing.should_wait(req, hit, chosen):
                self.cache.unmatch(req)          # next batch it hits what the sharer computes now
                num_held += 1
                continue
            remaining = req.seq_len - req.kv_len
            chunk = min(remaining, budget)
            if chunk < remaining and req.dllm_attn_block > 1:   # block-causal KV: whole blocks per forward
                chunk = block_chunk(req.kv_len, chunk, req.dllm_attn_block, remaining)
            if not self.cache.can_grow(req, req.kv_len + chunk, reserve_pages):
                self.cache.unmatch(req)
                break
            num_hit_tokens += hit
            self.cache.grow(req, req.kv_len + chunk)
            reqs.append(req)
            prefix_lens.append(req.kv_len)
            extend_lens.append(chunk)
            is_last_chunk.append(chunk == remaining)
            budget -= chunk
            if share:
                chosen.update(self.sharing.keys_of(req, req.kv_len + chunk))
        self.sharing.num_held_total += num_held
        self.sharing.in_flight = chosen      # NOTE: emptied by a batch of none: no hold twice in a row on nothing
        if not reqs:
            return None
        for req, chunk, done in zip(reqs, extend_lens, is_last_chunk):
            req.kv_len += chunk
            if done:
                self.waiting.remove(req)
                req.num_pending += 1
        return ScheduleBatch(reqs, ForwardMode.EXTEND, extend_lens=extend_lens,
                             prefix_lens=prefix_lens, is_last_chunk=is_last_chunk,
                             cached_len=num_hit_tokens)


def block_chunk(start: int, n: int, block: int, remaining: int) -> int:
    """A chunk of about `n` positions from `start` that ends on a multiple of `block` (each
    position of a block attends to the whole block, so a block is computed in one forward);
    with less than a block of budget, the rest of the current block (at most `remaining`)."""
    end = (start + n) // block * block
    return end - start if end > start else min(remaining, block - start % block)
