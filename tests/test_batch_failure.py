"""A failure costs one batch, not the worker: an exception while building, running or
processing a batch fails that batch's requests with an error naming the cause, frees
their pages and slots, and the same scheduler keeps serving (real model, both loops)."""
from __future__ import annotations

import pytest

from cluster.config import SchedulerConfig
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import drain, runner_for
from tests.queue_control import QueueControl

POISON = 4242                                  # a prompt holding this token breaks the forward


def poisoned_unified(loaded, overlap):
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner_for(loaded), ctl)
    forward = s.executor.forward_fn

    def forward_or_raise(fi):
        if bool((fi.input_ids == POISON).any()):
            raise RuntimeError("poisoned forward")
        return forward(fi)
    s.executor.forward_fn = forward_or_raise
    return s, ctl


def settle(s, ctl, n_done, overlap):
    drain([s], [None], lambda: len(ctl.finished()) + len(ctl.errors()) >= n_done)


@pytest.mark.parametrize("overlap", [False, True])
def test_failed_forward_fails_only_its_batch_and_the_worker_keeps_serving(loaded, overlap):
    tok = loaded.tokenizer
    ref_ctl = QueueControl()
    ref = UnifiedScheduler(SchedulerConfig(overlap=False), "ref", runner_for(loaded), ref_ctl)
    ref_ctl.generate("good", tok.encode("The capital of France is"), max_tokens=6)
    drain([ref], [None], lambda: len(ref_ctl.finished()) == 1)
    expected = ref_ctl.outputs()["good"]

    s, ctl = poisoned_unified(loaded, overlap)
    free_before = s.runner.page_allocator.num_free_pages
    ctl.generate("poison", tok.encode("Hello") + [POISON], max_tokens=6)
    settle(s, ctl, 1, overlap)
    [err] = ctl.errors()
    assert err.rid == "poison" and "RuntimeError: poisoned forward" in err.reason
    assert "batch [" in err.reason                     # names the iteration that failed
    assert not s.reqs
    assert s.runner.page_allocator.num_free_pages == free_before
    s.runner.page_allocator.check_integrity()

    ctl.generate("good", tok.encode("The capital of France is"), max_tokens=6)
    settle(s, ctl, 2, overlap)
    assert ctl.outputs()["good"] == expected and ctl.finished()["good"] == "length"
    assert s.runner.page_allocator.num_free_pages == free_before


def test_failed_result_processing_frees_the_batch(loaded):
    s, ctl = poisoned_unified(loaded, overlap=True)
    free_before = s.runner.page_allocator.num_free_pages
    process = s.process_batch_result
    calls = {"n": 0}

    def process_or_raise(batch, result):
        calls["n"] += 1
        if calls["n"] == 3:                            # a decode step of both requests
            raise ValueError("bad logits")
        return process(batch, result)
    s.process_batch_result = process_or_raise
    for i in range(2):
        ctl.generate(f"r{i}", loaded.tokenizer.encode(f"Count {i}:"), max_tokens=8)
    settle(s, ctl, 2, True)
    assert sorted(e.rid for e in ctl.errors()) == ["r0", "r1"]
    assert all("ValueError: bad logits" in e.reason for e in ctl.errors())
    assert not s.reqs and s.runner.page_allocator.num_free_pages == free_before
    s.process_batch_result = process
    ctl.generate("after", loaded.tokenizer.encode("Hi"), max_tokens=3)
    settle(s, ctl, 3, True)
    assert ctl.finished().get("after") == "length"
