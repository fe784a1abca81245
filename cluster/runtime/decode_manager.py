"""DecodeManager: the running set, and retraction when pages run out.

The running requests live in a `RunningBatch` (running_batch.py): a steady step touches only
the rows that cross into a new page; the rest is whole-array work.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.running_batch import RunningBatch
from cluster.runtime.schedule_batch import ForwardMode, MixedStep, Req, ScheduleBatch

if TYPE_CHECKING:
    from cluster.runtime.prefill_manager import PrefillManager


class DecodeManager:
    def __init__(self, cache: CacheManager, on_retract: Callable[[Req], None],
                 on_fail: Callable[[Req, str], None], can_wait_alone: Callable[[Req], bool] = lambda req: False):
        """`can_wait_alone(req)`: a request left alone in the running set and short of pages may be
        retracted to wait for pages that others hold without running yet (a decode worker's KV on
        its way); where false it fails, as a re-prefill could queue behind a prompt mid-prefill
        that holds those pages (a deadlock)."""
        self.cache = cache
        self.rows = RunningBatch(cache.page_size)
        self.on_retract = on_retract    # requeue the request to be prefilled again
        self.on_fail = on_fail          # finish the request with an error
        self.can_wait_alone = can_wait_alone
        self.num_retracted_total = 0

    @property
    def running(self) -> list[Req]:
        """The running requests, oldest first."""
        return self.rows.reqs

    def add(self, req: Req) -> None:
        self.rows.add(req)

    def remove(self, req: Req) -> None:
        self.rows.remove(req)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return int(self.rows.kv_lens[:len(self.rows)].sum())

    def schedule_after(self, prefill: "PrefillManager") -> Optional[ScheduleBatch]:
        """A prefill batch first, keeping one page per running request free for its next decode
        step; else this decode step. A request whose prompt the prefill completes joins the
        running set (its next decode reads the sampled token from its future slot)."""
        batch = prefill.schedule(len(self), reserve_pages=len(self))
        if batch is None:
            return self.schedule()
        for req, done in zip(batch.reqs, batch.is_last_chunk):
            if done:
                self.add(req)
        return batch

    def schedule_mixed(self, prefill: "PrefillManager",
                       chunk_tokens: Callable[[int], int]) -> Optional[ScheduleBatch]:
        """This decode step with a chunk of the waiting prompts in the same forward (decode-side
        prefill): `chunk_tokens(rows)` says how many prompt tokens a step of `rows` decode rows may
        carry. Without running requests there is no step to protect: a whole prefill batch. The
        mixed batch is one EXTEND forward whose first entries are the decode rows (one token each,
        fed from their future slots as in a decode step); a prompt it completes joins the running
        set for the next step."""
        if not len(self) or not len(prefill):
            return self.schedule_after(prefill)
        step = self.schedule()
        if step is None:                         # every row was retracted or failed
            return self.schedule_after(prefill)
        rows = len(step.reqs)
        budget = chunk_tokens(rows)
        chunk = prefill.schedule(len(self), reserve_pages=len(self), budget=budget) if budget > 0 else None
        if chunk is None:
            return step
        for req, done in zip(chunk.reqs, chunk.is_last_chunk):
            if done:
                self.add(req)
        return ScheduleBatch(step.reqs + chunk.reqs, ForwardMode.EXTEND, extend_lens=[1] * rows + chunk.extend_lens,
                             prefix_lens=step.prefix_lens + chunk.prefix_lens,
                             is_last_chunk=[True] * rows + chunk.is_last_chunk, cached_len=chunk.cached_len,
                             mix=MixedStep(rows, budget))

    def schedule(self) -> Optional[ScheduleBatch]:
        """One new token per running request; retract the newest while pages are short.

        The token fed at position `kv_len` is known, or (overlap) is the request's last
        sampled token, which the forward side reads from its future slot.
        """
        rows = self.rows
        while len(rows):
            missing = rows.rows_short_of_pages()
            if self.cache.can_allocate(int(missing.sum())):
                break
            victim = rows.reqs[-1]               # newest request
            # joined since the last decode launch with a result pending: its prefill is still in
            # flight (overlap), so its own KV is not (all) written yet; it must not reach the prefix
            # cache, whose pages a forward never writes (nor the host tier copy them)
            prefilling = bool(victim.num_pending) and victim in rows.joined
            rows.remove(victim)
            # alone, it waits only where it may and its next step fits the whole pool (else it would
            # retract again and again)
            if not len(rows) and not (self.can_wait_alone(victim)
                                      and self.cache.pages_for(victim.seq_len + 1) <= self.cache.num_pages):
                self.cache.free(victim)
                self.on_fail(victim, f"KV cache exhausted: {victim.seq_len} tokens do not fit the page pool")
                return None
            self.cache.release(victim, keep_kv=not prefilling)   # its KV stays cached until the pages are needed
            victim.kv_len = 0
            self.num_retracted_total += 1
            self.on_retract(victim)
        if not len(rows):
            return None
        for i in missing.nonzero()[0].tolist():  # only the rows that cross into a new page
            req = rows.reqs[i]
            self.cache.grow(req, req.kv_len + 1)
            rows.set_pages(i, req.page_table)
        reqs = list(rows.reqs)
        step = rows.launch()
        batch = ScheduleBatch(reqs, ForwardMode.DECODE, prefix_lens=step.positions.tolist(), rows=step)
        for r in reqs:
            r.kv_len += 1
            r.num_pending += 1
        return batch
