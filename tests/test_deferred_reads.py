"""Deferred reads of autoregressive results, the scheduler's side, on the CPU.

On CUDA an overlapped unified or decode worker's forward returns at launch: its outputs are pinned
copies still landing behind the forward on the stream, with an event (`ForwardOutput.ready`).
The CPU has no stream, so here the real forward runs and its outputs then land on an emulated
stream (`EmulatedStream`: one thread, launch order, a delay per forward), the host tensors holding
garbage until they do. What runs for real is what a deferred read relies on: the executor not
waiting and keeping its clock out of `step_s`, the overlap loop waiting for N's event only when it
processes N, `ForwardOutput.wait` and the span it reports, the output processor reading after.
The device half (pinned copies, CUDA events, no sync) is tests/test_engine_cuda.py's.
"""
from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.engine.forward_batch import ForwardOutput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.runtime.forward_executor import DEFER_READS_ENV, defer_reads
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import drain
from tests.queue_control import QueueControl
from tests.test_dllm_block_loop import ids_only

LANDING_S = 0.02        # how long an emulated forward stays on the "device" after its launch
SLOW_LANDING_S = 0.1    # longer than a tiny CPU forward on a busy machine
GARBAGE = -7            # what a host tensor holds until its copy lands
HANDSHAKE_TIMEOUT_S = 30.0   # bounds a hang only: a forward thread that never waits releases it at once


class Marker:
    """An event of the emulated stream: `query`, `synchronize` and `elapsed_time` as CUDA events have."""

    def __init__(self):
        self.fired = threading.Event()
        self.at = 0.0

    def fire(self) -> None:
        self.at = time.perf_counter()
        self.fired.set()

    def query(self) -> bool:
        return self.fired.is_set()

    def synchronize(self) -> None:
        assert self.fired.wait(30)

    def elapsed_time(self, end: "Marker") -> float:
        return (end.at - self.at) * 1e3


class EmulatedStream:
    """One worker thread runs what was enqueued in launch order, `landing_s` each."""

    def __init__(self, landing_s: float):
        self.landing_s = landing_s
        self.forward_iter = None             # of the forward now enqueueing (set by a LandingGate)
        self.gate = None                     # gate(forward_iter) before that forward lands
        self.work: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def enqueue(self, land) -> tuple[Marker, Marker]:
        started, ready = Marker(), Marker()
        self.work.put((started, land, ready, self.forward_iter))
        return started, ready

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            started, land, ready, forward_iter = item
            if self.gate is not None:
                self.gate(forward_iter)
            started.fire()
            time.sleep(self.landing_s)
            land()
            ready.fire()

    def close(self) -> None:
        self.work.put(None)
        self.thread.join(10)


class LandingGate:
    """Holds batch N on the emulated device until the forward thread has returned from N+1 (its
    trace line written), or until N is processed with nothing launched after it. A forward thread
    that never waits for the device then returns N+1 before N lands in every such pass, however
    loaded the machine (a 0.1 s landing against a tiny forward was a race CI-like load lost); one
    that waited for N would leave N waiting out the timeout (`late`)."""

    def __init__(self, s, stream: EmulatedStream):
        self.may_land: dict[int, threading.Event] = {}
        self.late: list[int] = []
        self._lock = threading.Lock()
        gate = self

        class ReleasingTrace(list):
            def append(self, line) -> None:      # ("forward", N+1, launched, returned)
                super().append(line)
                gate.release(line[1] - 1)

        launch, process = s.executor.on_launch, s._process

        def on_launch(forward_iter: int) -> None:   # the forward thread, right before that forward
            if launch is not None:
                launch(forward_iter)
            stream.forward_iter = forward_iter

        def process_last(batch, future) -> None:
            if s.forward_ct == batch.forward_iter:  # nothing launched after N: no N+1 to wait for
                gate.release(batch.forward_iter)
            process(batch, future)

        s.executor.trace, s.executor.on_launch, s._process = ReleasingTrace(), on_launch, process_last
        stream.gate = self.wait

    def release(self, forward_iter: int) -> None:
        self._event(forward_iter).set()

    def wait(self, forward_iter: int) -> None:
        if not self._event(forward_iter).wait(HANDSHAKE_TIMEOUT_S):
            self.late.append(forward_iter)

    def _event(self, forward_iter: int) -> threading.Event:
        with self._lock:
            return self.may_land.setdefault(forward_iter, threading.Event())


def landing_later(runner: ModelRunner, stream: EmulatedStream):
    """`runner.forward`, its host tensors garbage until the emulated stream lands them."""
    def forward(fi) -> ForwardOutput:
        out = runner.forward(fi)
        fields = [f for f in ("next_token_ids", "logprobs", "top_ids", "top_logprobs") if getattr(out, f) is not None]
        final = {f: getattr(out, f) for f in fields}
        for f in fields:
            setattr(out, f, torch.full_like(final[f], GARBAGE))
        out.started, out.ready = stream.enqueue(lambda: [getattr(out, f).copy_(final[f]) for f in fields])
        return out
    return forward


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(1)
    return ids_only(load_model("tiny-llama", load_format="dummy"))


PARAMS = [{"max_tokens": 9, "ignore_eos": True}, {"max_tokens": 4, "ignore_eos": True},
          {"max_tokens": 12, "logprobs": True, "top_logprobs": 2},
          {"max_tokens": 7, "temperature": 0.8, "seed": 5}, {"max_tokens": 10, "min_tokens": 3},
          {"max_tokens": 8, "repetition_penalty": 1.2, "ignore_eos": True}]


def serve(loaded, deferred: bool, landing_s: float = LANDING_S, gated: bool = False):
    ctl = QueueControl()
    runner = ModelRunner(loaded, 128, 16)
    stream = EmulatedStream(landing_s)
    s = UnifiedScheduler(SchedulerConfig(overlap=True, max_running_requests=8), "unified-0", runner, ctl)
    assert not s.defers_reads                   # the CPU never defers by itself
    if deferred:
        s.executor.forward_fn = landing_later(runner, stream)
    s.executor.trace, s.trace, steps = [], [], []
    s.landing_gate = LandingGate(s, stream) if gated else None
    process = s.process_batch_result
    s.process_batch_result = lambda b, r: (steps.append((r.ready, r.timings.get("step_s"))), process(b, r))[1]
    for i, sp in enumerate(PARAMS):
        ctl.generate(f"r{i}", [(5 * i + j) % 300 + 3 for j in range(4 + 3 * i)], **sp)
    try:
        drain([s], [None], lambda: len(ctl.finished()) == len(PARAMS))
    finally:
        s.executor.shutdown()
        stream.close()
    logprobs = [(it.rid, it.logprobs, it.top_logprobs) for m in ctl.sent if hasattr(m, "all_items")
                for it in m.all_items() if it.logprobs]
    assert logprobs
    return ctl, s, steps, logprobs


def test_deferred_results_are_read_only_once_landed_and_equal_waited_ones(loaded):
    waited, _, _, waited_lps = serve(loaded, deferred=False)
    got, s, steps, got_lps = serve(loaded, deferred=True)
    assert got.outputs() == waited.outputs() and got.finished() == waited.finished()
    assert got_lps == waited_lps and not got.errors() and s.reqs == {}
    # processed only after landing; step_s is the emulated span, not the forward thread's launch time
    assert all(ready is None for ready, _ in steps)
    assert all(step_s is not None and step_s >= LANDING_S * 0.9 for _, step_s in steps)


def test_batch_n_plus_one_is_launched_before_batch_n_lands(loaded):
    """The forward thread returned from N+1 before N's outputs landed (the emulated device still ran N)
    in every pass that launched N+1 before processing N, nearly all of them: it never waited for the
    device. The landing gate holds N until N+1 returned, so no load decides it."""
    _, s, _, _ = serve(loaded, deferred=True, landing_s=SLOW_LANDING_S, gated=True)
    launched = {it: t0 for _, it, t0, _ in s.executor.trace}    # both stamped by the scheduler thread
    returned = {it: t1 for _, it, _, t1 in s.executor.trace}
    processed = {it: t0 for _, it, t0, _ in s.trace}     # t0: after N's wait, when its processing starts
    overlapped = [it for it in processed if it + 1 in launched and launched[it + 1] < processed[it]]
    assert s.landing_gate.late == []
    assert len(overlapped) >= 10 and len(overlapped) >= sum(it + 1 in launched for it in processed) - 2
    assert all(returned[it + 1] < processed[it] for it in overlapped)


def test_a_read_that_never_lands_times_out():
    out = ForwardOutput(next_token_ids=torch.zeros(1, dtype=torch.int64), ready=Marker())
    with pytest.raises(TimeoutError):
        out.wait(timeout=0.05)


def test_reads_are_deferred_only_on_cuda_under_overlap_unless_switched_off(monkeypatch):
    monkeypatch.delenv(DEFER_READS_ENV, raising=False)
    assert defer_reads(True, True)                  # the default since measured on an H100
    monkeypatch.setenv(DEFER_READS_ENV, "1")
    assert defer_reads(True, True)
    assert not defer_reads(False, True) and not defer_reads(True, False)
    monkeypatch.setenv(DEFER_READS_ENV, "0")
    assert not defer_reads(True, True)
