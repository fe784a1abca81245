"""The 16-stream bench's first wave in one in-process unified worker, default model, prefix cache on:
16 prompts of 200 words cycled from 5 words (5 distinct, as `pdcluster bench` sends them), arriving
together, `--tokens` greedy tokens each. Pages cached at finish only and no hold (the behaviour
before prefix sharing) against prefix sharing (runtime/prefix_sharing.py), alternated per round.

    python benchmarks/prefix_sharing_wave.py [--rounds 3] [--tokens 8]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cluster.runtime.prefix_sharing as sharing_mod  # noqa: E402
import cluster.runtime.worker_scheduler as worker_mod  # noqa: E402
from cluster.bench.client import cycled_prompt  # noqa: E402
from cluster.config import SchedulerConfig  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.unified import UnifiedScheduler  # noqa: E402
from tests.inprocess_workers import drain, runner_for  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

SHOULD_WAIT, CACHE_PREFILLED = sharing_mod.PrefixSharing.should_wait, worker_mod.cache_prefilled


def first_wave(loaded, sharing: bool, tokens: int) -> tuple[float, int, int]:
    """-> (seconds until all 16 finished, prompt tokens computed, prefix-cache hit tokens)."""
    sharing_mod.PrefixSharing.should_wait = SHOULD_WAIT if sharing else (lambda self, *args: False)
    worker_mod.cache_prefilled = CACHE_PREFILLED if sharing else (lambda cache, batch: None)
    s = UnifiedScheduler(SchedulerConfig(overlap=True), "unified-0", runner_for(loaded, 1024), QueueControl())
    s.enable_prefix_cache()
    computed = []
    forward = s.executor.forward_fn
    s.executor.forward_fn = lambda fi: (computed.append(0 if fi.is_decode else sum(fi.extend_lens)), forward(fi))[1]
    ctl = s.control
    t0 = time.perf_counter()
    for i in range(16):
        ctl.generate(f"r{i}", loaded.tokenizer.encode(cycled_prompt(i, 200)), max_tokens=tokens, ignore_eos=True)
    drain([s], [None], lambda: len(ctl.finished()) == 16)
    return time.perf_counter() - t0, sum(computed), s.cache.num_hit_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    loaded = load_model()
    for _ in range(args.rounds):
        for sharing in (False, True):
            wall, computed, hits = first_wave(loaded, sharing, args.tokens)
            print(f"{'prefix sharing' if sharing else 'cached at finish'}: {wall:.2f} s, prompt tokens computed "
                  f"{computed}, cache hits {hits} (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
