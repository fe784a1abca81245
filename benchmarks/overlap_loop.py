"""Scheduler time of one loop pass with an empty model step (overlap vs normal loop).

    python benchmarks/overlap_loop.py [--passes 20000]

The forward does nothing, so what is timed is the loop itself: building a batch,
`run_batch` (forward_iter snapshot, hand-off to the forward thread), waiting for the
future and processing the result with its stats line (logging is off).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.scripted_scheduler import ScriptedScheduler  # noqa: E402


def time_passes(overlap: bool, passes: int) -> list[float]:
    s = ScriptedScheduler(["decode"] * (passes + 1), overlap=overlap)
    times, last = [], None
    for _ in range(passes):
        t0 = time.perf_counter()
        if overlap:
            last = s.overlap_step(last)
        else:
            s.normal_step()
        times.append(time.perf_counter() - t0)
    s.executor.shutdown()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=20000)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    for overlap in (True, False):
        t = time_passes(overlap, args.passes)
        q = statistics.quantiles(t, n=100)
        print(f"{'overlap' if overlap else 'normal '} loop: median {statistics.median(t) * 1e6:7.1f} us/pass, "
              f"p90 {q[89] * 1e6:7.1f} us, p99 {q[98] * 1e6:7.1f} us  ({args.passes} passes)")


if __name__ == "__main__":
    main()
