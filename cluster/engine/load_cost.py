"""LoadCost: whether a hit on the host tier is loaded back or recomputed.

Bytes / measured copy bandwidth (`copy_bandwidth`) against tokens / the worker's measured prefill
speed.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

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


def copy_bandwidth(src: torch.Tensor, device: torch.device) -> float:
    """Bytes per second of copying `src` (host memory, pinned on CUDA) to `device`: the load
    direction, best of three, measured once at start."""
    on_cuda = device.type == "cuda"
    best = float("inf")
    for _ in range(3):
        if on_cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst = src.to(device, non_blocking=True) if on_cuda else src.clone()
        if on_cuda:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
        del dst
    return src.numel() * src.element_size() / max(best, 1e-9)
