"""Prefix sharing between requests that run at the same time.

Two halves, as SGLang does them:
- `cache_prefilled(cache, batch)`: once a prefill forward has returned, the whole pages it
  wrote join the radix tree (`CacheManager.cache_prefix`), so a request arriving while the
  first still decodes extends from them instead of waiting for its finish.
- `PrefixSharing`: the prefill batch builder holds back a fresh request whose next pages
  (beyond its own cache hit) are being computed by a request chosen earlier in the same
  batch, or by the previous prefill batch, still in flight. It prefills one batch later on
  the cached pages instead of computing the same prefix again. It is held only while the
  sharer's forward is in flight (once it is processed, the request's cache hit covers those
  pages and the check no longer matches). A hold may leave nothing to launch beside that
  forward (a prefill worker): the overlap loop then processes it at once and the next pass
  prefills the held request on its pages, which beats computing them again a batch later.
  The in-flight keys are those of the last batch built, emptied when none was: a stale key (a
  sharer aborted in flight) holds a request for at most one such pass.

Pages are compared by chain keys: key k hashes the first k + 1 pages of token ids (with the
KV namespace), so equal keys mean equal whole-page prefixes (a hash collision costs one
batch of delay, never a wrong hit: hits come from the tree).
"""
from __future__ import annotations

from cluster.runtime.cache_manager import CacheManager, kv_namespace
from cluster.runtime.schedule_batch import Req, ScheduleBatch

MIN_SHARED_TOKENS = 32   # a shorter common prefix is cheaper to compute again than to wait for (SGLang's threshold)


def cache_prefilled(cache: CacheManager, batch: ScheduleBatch) -> None:
    """The prompt pages a processed EXTEND forward wrote go to the prefix cache (a mixed
    step's decode rows wrote one position each: not theirs to give)."""
    first = batch.num_decode_rows
    for req, prefix, extend in zip(batch.reqs[first:], batch.prefix_lens[first:], batch.extend_lens[first:]):
        cache.cache_prefix(req, prefix + extend)


def page_keys(req: Req, num_pages: int, page_size: int) -> list[int]:
    """Chain keys of `req`'s first `num_pages` whole pages."""
    ids, key, out = req.all_ids, kv_namespace(req), []
    for k in range(num_pages):
        key = hash((key, tuple(ids[k * page_size:(k + 1) * page_size])))
        out.append(key)
    return out


class PrefixSharing:
    """The pages being computed for sharing: this batch's chosen requests and the last batch's."""

    def __init__(self, page_size: int, min_shared_tokens: int = MIN_SHARED_TOKENS):
        self.page_size = page_size
        self.num_shared_pages = max(1, -(-min_shared_tokens // page_size))   # pages a hold needs in common
        self.in_flight: set[int] = set()   # keys of the pages the last prefill batch computes
        self.num_held_total = 0            # holds so far (a request held twice counts twice)

    def should_wait(self, req: Req, hit: int, chosen: set[int]) -> bool:
        """`req` (fresh, `hit` tokens from the cache) would compute at least `num_shared_pages`
        whole pages that a chosen or in-flight request computes now."""
        if req.dllm_attn_block > 1 or not (chosen or self.in_flight):   # block-causal: whole blocks, not pages
            return False
        last = hit // self.page_size + self.num_shared_pages     # pages its key covers
        if last * self.page_size > req.seq_len - 1:              # the last position is always computed
            return False
        key = page_keys(req, last, self.page_size)[-1]
        return key in chosen or key in self.in_flight

    def keys_of(self, req: Req, num_tokens: int) -> list[int]:
        """Keys of the whole pages `req` has once `num_tokens` positions are computed."""
        return page_keys(req, num_tokens // self.page_size, self.page_size)
