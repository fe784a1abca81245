"""LocalPrefill: the prompts a decode worker prefills itself (decode-side prefill), as chunks
riding in its decode steps, each chunk sized so the step stays within the `[slo] tpot` target.

Two kinds of request come here without a prefill peer: one whose uncached remainder is short
(`router.local_prefill_max_tokens`), and one the router moved off prefill workers whose
queueing would break the TTFT target while this worker had headroom (the router reads
`decode_side_prefill_rate` from the heartbeat). Both extend from this worker's prefix cache.

The chunk size comes from the worker's own `StepCostModel` (runtime/step_cost.py), fitted
from every forward it ran: time vs decode rows and prompt tokens. Without a TPOT target, or
without running requests to protect, a chunk is a whole `max_prefill_tokens` batch. When the
decode rows alone fill the budget a chunk is still one page, so a prompt keeps moving.
"""
from __future__ import annotations

import logging
from typing import Optional

from cluster.config import SchedulerConfig
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.prefill_manager import PrefillManager
from cluster.runtime.schedule_batch import ScheduleBatch
from cluster.runtime.step_cost import StepCostModel

logger = logging.getLogger("pdcluster.decode")


class LocalPrefill:
    def __init__(self, cache: CacheManager, config: SchedulerConfig, tpot: Optional[float] = None):
        self.queue = PrefillManager(cache, config.max_prefill_tokens, config.max_running_requests)
        self.cost = StepCostModel()
        self.tpot = tpot
        self.min_chunk = config.page_size
        self.num_tokens_total = 0          # decode_side_prefill_tokens_total

    def chunk_tokens(self, decode_rows: int) -> int:
        """Prompt tokens a step of `decode_rows` decode rows may carry."""
        limit = self.queue.max_prefill_tokens
        if self.tpot is None:
            return limit
        return max(min(self.min_chunk, limit), self.cost.chunk_tokens(decode_rows, self.tpot, limit))

    def observe(self, batch: ScheduleBatch, result) -> None:
        """A processed forward of this worker: a sample for the cost model; its prompt tokens counted."""
        timings = getattr(result, "timings", None) or {}
        rows, tokens = batch.num_decode_rows, batch.num_prefill_tokens
        self.cost.observe(rows, tokens, timings.get("step_s", 0.0))
        self.num_tokens_total += tokens
        if batch.mix is not None:   # the line a reader checks the budget against
            logger.info("Mixed step [%s]: #decode-req: %d, #prefill-token: %d, chunk budget: %d, "
                        "step %.1f ms (predicted %.1f ms, tpot target %s)", batch.forward_iter, rows, tokens,
                        batch.mix.chunk_budget, 1000 * timings.get("step_s", 0.0),
                        1000 * self.cost.predict(rows, tokens),
                        "-" if self.tpot is None else f"{1000 * self.tpot:.1f} ms")

    def gauges(self, num_running: int) -> dict:
        """On the heartbeat thread: the headroom beside `num_running` decode rows, as fitted so far
        (0 before any forward: no evidence of headroom yet)."""
        rate = self.cost.prefill_rate(num_running, self.tpot, self.queue.max_prefill_tokens) \
            if self.cost.num_steps else 0.0
        return {"num_queue_tokens": self.queue.num_tokens, "decode_side_prefill_rate": rate,
                "decode_side_prefill_tokens_total": self.num_tokens_total}
