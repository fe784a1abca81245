"""Deferred reads of the overlapped unified worker on a CUDA device (skipped where there is none):
its forward returns at launch and the scheduler waits for N's event when it processes N; tokens equal
the waited mode's, and N + 1 is launched before N is processed. `PDCLUSTER_DEFER_READS` switches it."""
from __future__ import annotations

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.unified import UnifiedScheduler
from tests.engine_fixtures import tiny_cuda_runner
from tests.inprocess_workers import drain
from tests.queue_control import QueueControl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- deferred reads: the overlapped unified worker's forward returns at launch ------------------
DEVICE_SLEEP_CYCLES = 10_000_000    # ~5 ms of device time queued ahead of every forward


def serve_overlapped(runner, monkeypatch, prompts, params, defer: bool, slow_device: bool = False):
    """The unified worker over `runner` (overlap, prompts chunked by 64) with its reads deferred or
    waited (`PDCLUSTER_DEFER_READS`); `slow_device`: each forward holds the stream ~5 ms longer."""
    monkeypatch.setenv("PDCLUSTER_DEFER_READS", "1" if defer else "0")
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=True, max_running_requests=len(prompts), max_prefill_tokens=64),
                         "unified-0", runner, ctl)
    assert s.defers_reads == defer
    if slow_device:
        launch = s.executor.forward_fn            # runs inside the forward stream's context
        s.executor.forward_fn = lambda fi: (torch.cuda._sleep(DEVICE_SLEEP_CYCLES), launch(fi))[1]
    s.executor.trace, s.trace = [], []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ctl.generate(f"r{i}", p, **sp)
    try:
        drain([s], [None], lambda: len(ctl.finished()) + len(ctl.errors()) == len(prompts))
    finally:
        s.executor.shutdown()
    assert not ctl.errors() and s.reqs == {}
    return ctl, s


@pytest.mark.parametrize("batch", [1, 64])
def test_deferred_decode_equals_waited_decode(monkeypatch, batch):
    """Greedy tokens identical; at batch 64 also rows that sample on the host side of the graph
    (logprobs, a seed, penalties: the eager sampler's pinned copies) and prompts chunked (rows that
    sample nothing in a prefill)."""
    runner = tiny_cuda_runner()
    prompts = [[(17 * i + j) % 900 + 3 for j in range(1 + (37 * i) % 100)] for i in range(batch)]
    params = [{"max_tokens": 12 + i % 5, "ignore_eos": True} for i in range(batch)]
    if batch > 1:
        params[1].update(logprobs=True, top_logprobs=3)
        params[2].update(temperature=0.8, seed=7)
        params[3].update(repetition_penalty=1.3)
    waited, _ = serve_overlapped(runner, monkeypatch, prompts, params, defer=False)
    deferred, s = serve_overlapped(runner, monkeypatch, prompts, params, defer=True)
    assert deferred.outputs() == waited.outputs() and deferred.finished() == waited.finished()
    lps = [[(it.rid, it.logprobs, it.top_logprobs) for m in c.sent if hasattr(m, "all_items")
            for it in m.all_items() if it.logprobs] for c in (waited, deferred)]
    assert lps[0] == lps[1]


def test_deferred_decode_launches_n_plus_one_before_n_is_processed(monkeypatch):
    """With ~5 ms of device time per forward: deferred, the forward thread returns from N+1 before
    N's outputs are read in nearly every pass; waited, it cannot (it syncs the stream after N+1, which
    ends ~5 ms after N), unless the scheduler thread stalls that long."""
    runner = tiny_cuda_runner()
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(8)]
    params = [{"max_tokens": 24, "ignore_eos": True}] * len(prompts)
    early = {}
    for defer in (False, True):
        _, s = serve_overlapped(runner, monkeypatch, prompts, params, defer=defer, slow_device=True)
        returned = {it: t1 for _, it, _, t1 in s.executor.trace}
        processed = {it: t0 for _, it, t0, _ in s.trace}     # t0: once N's outputs are on the host
        pairs = [(returned[it + 1], processed[it]) for it in processed if it + 1 in returned]
        assert len(pairs) >= 20
        early[defer] = (sum(launch < read for launch, read in pairs), len(pairs))
    assert early[False][0] <= 1                # a stall of the scheduler thread past ~5 ms, at most
    assert early[True][0] >= early[True][1] - 2, early
