"""A DLLM scheduler run to completion over a real runner, the router end a QueueControl (for the
DLLM scheduler and model tests)."""
from __future__ import annotations

import contextlib
import threading
import time

from cluster.config import SchedulerConfig
from cluster.dllm_params import DllmParams
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol as P
from dllm.model_spec import DllmModelSpec
from dllm.scheduler import DllmScheduler
from tests.queue_control import QueueControl

PLACEHOLDER = 0                 # the mask placeholder of a causal model (no mask token)
PROMPTS = [[5, 17, 33, 101, 7], [9, 250, 3, 77, 44, 12, 8, 91, 60], [300, 301]]


def run_dllm(runner, requests, params=DllmParams(), overlap=False, spec=None, trace=False,
             on_forward=None, split=None, timeout=120.0, block_loop=None, during=contextlib.nullcontext,
             chain_rounds=None, prefix_cache=False):
    """requests: [(rid, prompt, sampling kwargs, extra)] -> (control, scheduler) once all finished.
    `during()`: a context the run (not the scheduler's construction) happens in."""
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=overlap, max_prefill_tokens=64), "dllm-0", runner, control,
                          spec or DllmModelSpec.causal(PLACEHOLDER), params, split_groups=split,
                          block_loop=block_loop, chain_rounds=chain_rounds)
    if prefix_cache:
        sched.enable_prefix_cache()
    sched.commit_trace = []
    if trace:
        sched.trace, sched.executor.trace = [], []
    if on_forward is not None:
        build = sched.build_forward_input
        sched.build_forward_input = lambda b: on_forward(b, build(b))
    free_before = runner.page_allocator.num_free_pages
    for rid, prompt, sampling, extra in requests:
        control.inbound.put(P.Generate(rid=rid, input_ids=list(prompt), sampling=SamplingParams(**sampling),
                                       dllm=dict(extra)))
    with during():
        loop = threading.Thread(target=sched.event_loop, daemon=True)
        loop.start()
        deadline = time.monotonic() + timeout
        while len(control.finished()) + len(control.errors()) < len(requests) and time.monotonic() < deadline:
            time.sleep(0.005)
        sched.stop()
        loop.join(timeout=30)
    if prefix_cache:
        sched.cache.drop_prefix_cache()
    assert len(control.finished()) == len(requests), f"unfinished: {control.finished()} {control.errors()}"
    assert runner.page_allocator.num_free_pages == free_before, "pages leaked"
    return control, sched


def launched_before_processed(sched) -> int:
    """Rounds N whose successor N+1 was launched before N's processing began: the overlap schedule
    itself. Decided by the scheduler thread's own order, so no load on the machine changes it
    (a forward that finishes before the processing starts still counts: how long the tiny model's
    forward takes is the machine's business, CI saw 6 of 17 intervals overlap under load)."""
    launched = {it: t0 for _, it, t0, _ in sched.executor.trace}
    return sum(1 for _, it, p0, _ in sched.trace if it + 1 in launched and launched[it + 1] < p0)


def chained_and_sequential(runner, requests, params, **kw):
    """(chained run, sequential block-round run) of the same requests under overlap with the block
    loop: each a (control, scheduler) of `run_dllm`."""
    chained = run_dllm(runner, requests, params, overlap=True, block_loop=True, **kw)
    sequential = run_dllm(runner, requests, params, overlap=True, block_loop=True, chain_rounds=False, **kw)
    return chained, sequential


def reqs(prompts=PROMPTS, extra=None, **sampling):
    sampling = {"max_tokens": 11, **sampling}
    return [(f"r{i}", p, sampling, extra or {}) for i, p in enumerate(prompts)]
