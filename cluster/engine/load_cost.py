"""LoadCost: whether a hit on the host tier is loaded back or recomputed.

Bytes / measured copy bandwidth against tokens / the worker's measured prefill speed.
"""
from __future__ import annotations

from typing import Optional

PREFILL_EWMA = 0.3        # weight of the newest prefill-speed sample


class LoadCost:
    """Predicted seconds to load host pages back against recomputing their tokens."""

    def __init__(self, copy_bytes_per_s: float, bytes_per_token: int):
        self.copy_bytes_per_s = copy_bytes_per_s
        self.bytes_per_token = bytes_per_token
        self.prefill_tokens_per_s: Optional[float] = None   # until the first prefill is timed

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        speed = num_tokens / seconds
        old = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = speed if old is None else old + PREFILL_EWMA * (speed - old)

    def load_seconds(self, num_tokens: int) -> float:
        return num_tokens * self.bytes_per_token / self.copy_bytes_per_s

    def recompute_seconds(self, num_tokens: int) -> float:
        return num_tokens / self.prefill_tokens_per_s if self.prefill_tokens_per_s else float("inf")

    def should_load(self, num_tokens: int) -> bool:
        return self.load_seconds(num_tokens) < self.recompute_seconds(num_tokens)
