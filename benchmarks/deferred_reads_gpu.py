"""The unified worker's decode step, its reads deferred against waited, in one process (no HTTP).

What runs is the real `UnifiedScheduler` under the overlap loop over a real `ModelRunner` (dummy
weights, CUDA graphs), fed by an in-process control stand-in: B requests of ~130-token prompts are
prefilled, then `--steps` steady decode steps are timed (wall ms per step). Each batch alternates
the two modes `--rounds` times, in swapped order every round, on the same runner:

- waited (`PDCLUSTER_DEFER_READS=0`): the forward thread syncs the stream at the end of every forward;
- deferred (`PDCLUSTER_DEFER_READS=1`): the forward returns at launch, the scheduler waits for N's event when it processes N.

Also per mode: the share of the wall time the forward stream was covered by a forward (CUDA events
around each forward on the stream, from the forward thread's start to its end; gaps = the device
waiting for the host), and the engine alone (`ModelRunner.forward` steps back to back, each read
after the next is launched: the floor) at the same batch and context.

    python benchmarks/deferred_reads_gpu.py                       # H100: Llama-3.2-1B shapes, bf16, ~1 min
    python benchmarks/deferred_reads_gpu.py --device cpu --dtype float32 --preset tiny-llama \\
        --batches 1,8 --steps 20 --rounds 1                       # CPU rehearsal (both modes wait there)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.engine_gpu import bench_engine_decode  # noqa: E402
from cluster.config import SchedulerConfig  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.runtime.forward_executor import DEFER_READS_ENV  # noqa: E402
from cluster.unified import UnifiedScheduler  # noqa: E402
from cluster.wire import protocol as P  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

PROMPT_LEN = 130
PAGE_SIZE = 16
WARMUP_STEPS = 10


class IdsOnlyTokenizer:
    """Dummy weights carry no tokenizer; these runs stream ids (ignore_eos, no stop strings)."""
    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return ""


class StreamSpans:
    """CUDA timing events around every forward on the forward stream (`forward_fn` wrapped)."""

    def __init__(self, forward_fn, on_cuda: bool):
        self.forward_fn, self.on_cuda, self.spans = forward_fn, on_cuda, []

    def __call__(self, fi):
        if not self.on_cuda:
            return self.forward_fn(fi)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.forward_fn(fi)
        end.record()
        self.spans.append((start, end))
        return out

    def covered_s(self) -> float:
        if not self.spans:
            return 0.0
        self.spans[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3


def measure(runner, batch: int, defer: bool, steps: int, on_cuda: bool) -> dict:
    """Wall ms per steady decode step of the unified worker at `batch`, and the stream's covered share."""
    os.environ[DEFER_READS_ENV] = "1" if defer else "0"
    ctl = QueueControl()
    cfg = SchedulerConfig(overlap=True, num_pages=runner.page_allocator.num_pages, max_running_requests=batch,
                          max_prefill_tokens=8192)
    s = UnifiedScheduler(cfg, "unified-0", runner, ctl)
    assert s.defers_reads == (defer and on_cuda)
    spans = StreamSpans(s.executor.forward_fn, on_cuda)
    s.executor.forward_fn = spans
    for i in range(batch):
        ctl.generate(f"r{i}", [(31 * i + 7 * j) % 20000 + 100 for j in range(PROMPT_LEN)],
                     max_tokens=1 << 20, ignore_eos=True)
    last, deadline = None, time.monotonic() + 120
    while len(s.decode) < batch or len(s.prefill):
        last = s.overlap_step(last)
        assert time.monotonic() < deadline, "prefill did not finish"
    for _ in range(WARMUP_STEPS):
        last = s.overlap_step(last)
    spans.covered_s()
    spans.spans.clear()
    t0 = time.perf_counter()
    for _ in range(steps):
        last = s.overlap_step(last)
    wall = time.perf_counter() - t0
    covered = spans.covered_s()
    assert len(s.decode) == batch and not ctl.errors(), "requests left the batch during the measurement"
    for rid in list(s.reqs):
        ctl.inbound.put(P.Abort(rid=rid, reason="measured"))
    while s.reqs or last is not None:
        last = s.overlap_step(last)
    s.executor.shutdown()
    return {"ms_per_step": 1e3 * wall / steps, "stream_covered": covered / wall if on_cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b", help="a named model config (dummy weights)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two modes per batch")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    on_cuda = args.device.startswith("cuda")
    if not on_cuda:
        torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_model(args.preset, load_format="dummy", dtype=args.dtype, device=args.device)
    loaded._tokenizer = IdsOnlyTokenizer()
    # the scheduler's runs and the engine alone (at context PROMPT_LEN + steps // 2, then `steps` more)
    tokens = max(PROMPT_LEN + WARMUP_STEPS + args.steps + 8, PROMPT_LEN + args.steps // 2 + args.steps + 2)
    num_pages = max(batches) * (-(-tokens // PAGE_SIZE) + 1) + 64
    t0 = time.perf_counter()
    runner = ModelRunner(loaded, num_pages, PAGE_SIZE, args.device, args.dtype, max_decode_batch=max(batches))
    print(f"{args.preset} {args.dtype} on {torch.cuda.get_device_name() if on_cuda else 'cpu'}; runner ready in "
          f"{time.perf_counter() - t0:.1f} s; {args.steps} steps x {args.rounds} rounds per mode", flush=True)
    figures = {}
    for b in batches:
        runs = {"waited": [], "deferred": []}
        for r in range(args.rounds):
            for defer in ((False, True) if r % 2 == 0 else (True, False)):
                runs["deferred" if defer else "waited"].append(measure(runner, b, defer, args.steps, on_cuda))
        engine = bench_engine_decode(runner, argparse.Namespace(decode_steps=args.steps, device=args.device), b,
                                     PROMPT_LEN + args.steps // 2, overlap=True)
        best = {m: min(x["ms_per_step"] for x in v) for m, v in runs.items()}
        med = {m: statistics.median(x["ms_per_step"] for x in v) for m, v in runs.items()}
        cover = {m: statistics.median(x["stream_covered"] for x in v) if on_cuda else None for m, v in runs.items()}
        figures[b] = {"runs": runs, "best_ms": best, "median_ms": med, "engine_alone_ms": engine}
        cov = "" if not on_cuda else f"; stream covered {cover['waited']:.0%} -> {cover['deferred']:.0%}"
        print(f"batch {b:4d}: waited {med['waited']:.3f} ms/step (best {best['waited']:.3f}), deferred "
              f"{med['deferred']:.3f} (best {best['deferred']:.3f}): deferred/waited {med['deferred'] / med['waited']:.3f}"
              f"{cov}; engine alone {engine:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
