"""Scheduler base: `run_batch`, and the normal and overlap loops side by side.

A role (prefill, decode, unified, dllm) subclasses `Scheduler` and supplies four steps:
`recv_requests`, `get_next_batch_to_run`, `build_forward_input` and
`process_batch_result`. The two loops share every step; only the order differs.
The scheduler owns its `IterationStats` (`stats.py`): `report_prefill_stats(batch, ...)` and
`report_decode_stats(batch, ...)` label a line with the iteration that launched `batch`.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional

from cluster.config import SchedulerConfig
from cluster.runtime.forward_executor import ForwardExecutor
from cluster.runtime.stats import DecodeStats, IterationStats, PrefillStats
from cluster.runtime.schedule_batch import ScheduleBatch

logger = logging.getLogger("pdcluster.scheduler")

FORWARD_TIMEOUT_S = 600.0   # a forward that takes longer is a hang, not a slow batch


class Scheduler:
    role = "base"

    def __init__(self, config: SchedulerConfig, worker_id: str, forward_fn, on_cuda: bool = False,
                 on_launch: Optional[Callable[[int], None]] = None, cpu_threads: Optional[int] = None):
        """`on_launch(forward_iter)`: on the forward thread, right before that forward runs;
        `cpu_threads`: the forward thread's torch threads (ForwardExecutor)."""
        self.config = config
        self.worker_id = worker_id
        self.forward_ct = 0             # only run_batch increments it
        self.stats = IterationStats(config.log_forward_iters, config.decode_log_interval)
        self.executor = ForwardExecutor(forward_fn, threaded=config.overlap, on_cuda=on_cuda, on_launch=on_launch,
                                        cpu_threads=cpu_threads)
        self.is_running = True
        self.trace: Optional[list[tuple[str, int, float, float]]] = None   # ("process", iter, t0, t1)

    # ---- the four role steps -------------------------------------------------
    def recv_requests(self) -> None:
        raise NotImplementedError

    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        raise NotImplementedError

    def build_forward_input(self, batch: ScheduleBatch) -> Any:
        raise NotImplementedError

    def process_batch_result(self, batch: ScheduleBatch, result: Any) -> None:
        raise NotImplementedError

    def on_idle(self) -> None:
        """Nothing launched and nothing to process: wait briefly for input."""
        time.sleep(0.001)

    # ---- shared machinery ----------------------------------------------------
    def run_batch(self, batch: ScheduleBatch) -> Future:
        self.forward_ct += 1
        batch.forward_iter = self.forward_ct   # NOTE: snapshot first, before anything else
        try:
            forward_input = self.build_forward_input(batch)
        except Exception as e:                 # fails in _process, like a failed forward
            failed: Future = Future()
            failed.set_exception(e)
            return failed
        return self.executor.submit(batch.forward_iter, forward_input)

    # ---- stats, labelled with the iteration that launched the batch ---------------
    def iteration_of(self, batch: Optional[ScheduleBatch]) -> int:
        if batch is not None and batch.forward_iter is not None:
            return batch.forward_iter
        return self.forward_ct

    def report_prefill_stats(self, batch: Optional[ScheduleBatch], stats: PrefillStats) -> str:
        return self.stats.report_prefill(self.iteration_of(batch), stats)

    def report_decode_stats(self, batch: Optional[ScheduleBatch], stats: DecodeStats) -> Optional[str]:
        num_new_tokens = batch.num_decode_rows if batch is not None else stats.num_running_reqs
        return self.stats.report_decode(self.iteration_of(batch), num_new_tokens, stats)

    def _process(self, batch: ScheduleBatch, future: Future) -> None:
        """Process one batch's result; a failure anywhere in building, running, sampling
        or processing it costs that batch's requests, never the process."""
        t0 = time.perf_counter()
        try:
            result = future.result(timeout=FORWARD_TIMEOUT_S)
            if getattr(result, "ready", None) is not None:
                result.wait()           # a deferred read (forward_executor.py): N's outputs land now
            t0 = time.perf_counter()
            self.on_result(batch)
            self.process_batch_result(batch, result)
        except Exception as e:
            logger.exception("%s: batch [%s] failed", self.worker_id, batch.forward_iter)
            self.fail_batch(batch, f"batch [{batch.forward_iter}] failed: {type(e).__name__}: {e}")
        if self.trace is not None:
            self.trace.append(("process", batch.forward_iter, t0, time.perf_counter()))

    def on_result(self, batch: ScheduleBatch) -> None:
        """The batch's forward is done; its result is processed next (request tracing)."""

    def fail_batch(self, batch: ScheduleBatch, reason: str) -> None:
        """Fail the batch's requests with `reason` and free what they hold (roles)."""

    def normal_step(self) -> None:
        self.recv_requests()
        batch = self.get_next_batch_to_run()
        if batch is None:
            self.on_idle()
            return
        future = self.run_batch(batch)
        self._process(batch, future)

    def overlap_step(self, last: Optional[tuple[ScheduleBatch, Future]]) -> Optional[tuple[ScheduleBatch, Future]]:
        """Launch batch N+1, then process batch N while N+1's forward runs."""
        self.recv_requests()
        batch = self.get_next_batch_to_run()
        ongoing = None
        if batch is not None:
            future = self.run_batch(batch)
            ongoing = (batch.copy(), future)   # the copy carries the launch snapshot
        if last is not None:
            self._process(*last)
        elif ongoing is None:
            self.on_idle()
        return ongoing

    def event_loop_normal(self) -> None:
        while self.is_running:
            self.normal_step()

    def event_loop_overlap(self) -> None:
        last = None
        while self.is_running:
            last = self.overlap_step(last)
        if last is not None:
            self._process(*last)

    def event_loop(self) -> None:
        try:
            if self.config.overlap:
                self.event_loop_overlap()
            else:
                self.event_loop_normal()
        finally:
            self.executor.shutdown()

    def stop(self) -> None:
        self.is_running = False
