"""Runs forwards: inline (normal loop) or on one forward thread (overlap loop).

One thread, so forwards stay in launch order: batch N+1's forward starts only after
N's finished, which is what lets N+1 read N's sampled tokens from the future map and
lets pages freed while N+1 runs be reused only by N+2. On CUDA a forward whose output
carries a pending `ready` event (a deferred read: an autoregressive step's tokens, a DLLM
block round's) returns once launched: N+1 is then queued behind N on the same stream, which
keeps that order on the device (N+1 resolves N's tokens from the future map there, and N+2,
the first to get pages freed while N+1 runs, is queued behind N+1), and the scheduler waits
for `ready` before it reads N's output (`Scheduler._process`). Such an output's `step_s` is
its span on the device (`ForwardOutput.wait`), not the forward thread's clock, which stops
at the launch.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

# 1 (the default) = an autoregressive forward returns at launch, its outputs read later; 0 = the forward
# thread syncs the stream after each forward (H100, 1B: deferred steps 0.72-0.74x waited ones, BENCHMARKS.md)
DEFER_READS_ENV = "PDCLUSTER_DEFER_READS"


def defer_reads(on_cuda: bool, overlap: bool) -> bool:
    """Whether a worker's forwards return at launch with their reads deferred: on CUDA under overlap
    unless switched off (a CPU forward is done when it returns; the normal loop reads each result before
    the next launch)."""
    return on_cuda and overlap and os.environ.get(DEFER_READS_ENV, "1") != "0"


class ForwardExecutor:
    def __init__(self, forward_fn: Callable[[Any], Any], threaded: bool, on_cuda: bool = False,
                 on_launch: Optional[Callable[[int], None]] = None, cpu_threads: Optional[int] = None):
        """`cpu_threads`: the torch threads of the forward thread (each thread has its own count;
        the worker's main thread keeps one, omp_team.py)."""
        self.forward_fn = forward_fn
        self.threaded = threaded
        init = (_set_torch_threads, (cpu_threads,)) if cpu_threads else (None, ())
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward", initializer=init[0], initargs=init[1])
            if threaded else None)
        self._stream = None
        if threaded and on_cuda:
            import torch
            self._stream = torch.cuda.Stream()
        # ("forward", iter, launched_at, finished_at): a batch is in flight from its launch
        # (the forward thread may wake a little later) until its forward returns
        self.trace: Optional[list[tuple[str, int, float, float]]] = None
        self._trace_lock = threading.Lock()
        # f(forward_iter) on the forward thread right before that forward runs (layer-wise KV
        # streaming picks the plan of the forward it is about to see)
        self.on_launch = on_launch

    def submit(self, forward_iter: int, forward_input: Any) -> Future:
        t0 = time.perf_counter()
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(self._run(forward_iter, forward_input, t0))
            except Exception as e:             # raised when processed, as on the thread
                fut.set_exception(e)
            return fut
        return self._pool.submit(self._run, forward_iter, forward_input, t0)

    def _run(self, forward_iter: int, forward_input: Any, t0: float) -> Any:
        if self.on_launch is not None:
            self.on_launch(forward_iter)
        started = time.perf_counter()
        if self._stream is not None:
            import torch
            with torch.cuda.stream(self._stream):
                out = self.forward_fn(forward_input)
                if getattr(out, "ready", None) is None:   # else a deferred read: its reader waits for `ready`
                    self._stream.synchronize()
        else:
            out = self.forward_fn(forward_input)
        timings = getattr(out, "timings", None)
        if isinstance(timings, dict) and getattr(out, "ready", None) is None:
            # the forward alone, not its wait behind the previous one (step costs)
            timings["step_s"] = time.perf_counter() - started
        if self.trace is not None:
            with self._trace_lock:
                self.trace.append(("forward", forward_iter, t0, time.perf_counter()))
        return out

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _set_torch_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
