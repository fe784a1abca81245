"""DLLM block rounds on a CUDA device (skipped where there is none): the block-step CUDA graphs
captured at startup per (batch bucket, lead room), graph replay against the eager block loop and
against per-forward host rounds, bucket choice, and no host sync but the one read per round (plus
one flag per low_confidence step). Chained rounds (overlap: a round launched from the last one's
tokens still on the device, its read deferred) against rounds launched one after the other.

Run on a GPU machine: `python -m pytest tests/test_dllm_cuda.py`.
"""
import contextlib
import warnings

import pytest
import torch

from cluster.dllm_params import DllmParams
from cluster.engine.cuda_graphs import batch_buckets
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from tests.dllm_runs import PROMPTS, chained_and_sequential, reqs, run_dllm
from dllm.model_spec import detect_spec
from tests.test_dllm_block_loop import commits_by_request, ids_only
from tests.test_dllm_models import llada_dir, sdar_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# thresholds far from the tiny model's confidences: float noise between kernels never flips a commit
PARAMS = [DllmParams(block_size=4, threshold=0.0), DllmParams(block_size=4, threshold=0.9),
          DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)]


@pytest.fixture(scope="module")
def runner():
    loaded = ids_only(load_model("tiny-llama", load_format="dummy", device="cuda"))
    return ModelRunner(loaded, 512, 16, "cuda", "float32", max_decode_batch=8)


def test_block_graphs_are_captured_at_startup_for_every_bucket_and_lead_room(runner):
    _, sched = run_dllm(runner, reqs(max_tokens=4, ignore_eos=True), PARAMS[0])
    graphs = sched.block_loop.graphs
    assert graphs is not None and graphs.capture_s > 0
    assert set(graphs.steps) == {(b, lead) for b in batch_buckets(64) for lead in (1, 5)}   # causal: shift 1
    assert all(step.graph is not None for step in graphs.steps.values())


def test_buckets_take_the_smallest_that_fits_and_none_past_the_largest(runner):
    _, sched = run_dllm(runner, reqs(max_tokens=4, ignore_eos=True), PARAMS[0])
    graphs = sched.block_loop.graphs
    assert [graphs.bucket(n) for n in (1, 2, 3, 5, 64)] == [1, 2, 4, 8, 64] and graphs.bucket(65) is None
    assert graphs.state_shape(3, 4, 2, 1) == (4, 4, 16, 4)
    assert graphs.state_shape(3, 8, 2, 1) is None           # wider blocks than captured: eager


@pytest.mark.parametrize("params", PARAMS)
def test_graph_block_rounds_equal_eager_block_rounds_and_host_rounds(runner, params, monkeypatch):
    requests = reqs(max_tokens=13, ignore_eos=True)
    graphed, gs = run_dllm(runner, requests, params, block_loop=True)
    assert gs.block_loop.num_graph_steps > 0
    host, hs = run_dllm(runner, requests, params, block_loop=False)
    monkeypatch.setenv("PDCLUSTER_CUDA_GRAPHS", "0")
    eager, es = run_dllm(runner, requests, params, block_loop=True)
    assert es.block_loop.graphs is None and es.block_loop.num_eager_steps > 0
    assert graphed.outputs() == eager.outputs() == host.outputs()
    assert commits_by_request(gs) == commits_by_request(es) == commits_by_request(hs)


def test_blocks_wider_than_captured_run_eagerly_and_equally(runner):
    # two whole blocks of 8: a shorter last block (max_tokens=10 gives 8 + 2) fits the captured width
    requests = reqs(max_tokens=16, ignore_eos=True, extra={"block_size": 8})
    graphed, gs = run_dllm(runner, requests, PARAMS[1], block_loop=True)      # captured for blocks of 4
    host, _ = run_dllm(runner, requests, PARAMS[1], block_loop=False)
    assert gs.block_loop.num_graph_steps == 0 and gs.block_loop.num_eager_steps > 0
    assert graphed.outputs() == host.outputs()


@pytest.mark.parametrize("which", ["llada", "sdar"])
def test_llada_and_sdar_graph_rounds_equal_host_rounds(which, llada_dir, sdar_dir):  # noqa: F811
    path = llada_dir if which == "llada" else sdar_dir
    runner = ModelRunner(ids_only(load_model("m", path, device="cuda")), 64, 4, "cuda", "float32",
                         max_decode_batch=4)
    requests = reqs(prompts=[[5, 9, 40, 3, 77], [1, 2, 3]], max_tokens=10, ignore_eos=True)
    for params in PARAMS[1:]:
        graphed, gs = run_dllm(runner, requests, params, spec=detect_spec(path), block_loop=True)
        host, hs = run_dllm(runner, requests, params, spec=detect_spec(path), block_loop=False)
        assert gs.block_loop.num_graph_steps > 0 and {lead for _, lead in gs.block_loop.graphs.steps} == {0, 4}
        assert graphed.outputs() == host.outputs() and commits_by_request(gs) == commits_by_request(hs)


@contextlib.contextmanager
def no_sync_allowed(syncs: list, caught: list):
    """Records synchronizing copies (sync debug mode) and torch.cuda.synchronize calls."""
    torch.cuda.synchronize()
    original = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: syncs.append(1)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            yield
        caught += [str(w.message) for w in got if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize = original


@pytest.mark.parametrize("params", [PARAMS[1], PARAMS[2]])
def test_block_rounds_never_sync_the_device_and_read_once_per_round(runner, params):
    """fixed_steps: one read per round; low_confidence: plus one 8-byte flag per later step. Neither a
    synchronizing copy nor torch.cuda.synchronize while the rounds run (captures happen before)."""
    syncs, caught = [], []
    _, sched = run_dllm(runner, reqs(max_tokens=12, ignore_eos=True), params, block_loop=True,
                        during=lambda: no_sync_allowed(syncs, caught))
    assert not caught and not syncs
    loop = sched.block_loop
    steps = loop.num_graph_steps + loop.num_eager_steps
    assert loop.num_graph_steps > 0
    if params.algorithm == "fixed_steps":
        assert loop.num_host_reads == sched.forward_ct and steps == 2 * sched.forward_ct
    else:
        assert sched.forward_ct < loop.num_host_reads <= sched.forward_ct + steps


# ---- chained rounds: launched from the tokens of the round before, still on the device ----------------
@pytest.mark.parametrize("params", PARAMS)
def test_chained_graph_rounds_equal_sequential_graph_rounds_and_host_rounds(runner, params):
    requests = reqs(max_tokens=13, ignore_eos=True, logprobs=True)
    (got, gs), (seq, ss) = chained_and_sequential(runner, requests, params)
    host, _ = run_dllm(runner, requests, params, block_loop=False)
    assert gs.num_chained_rounds > 0 and gs.block_loop.num_graph_steps > 0 and gs.block_loop.defer_read
    assert ss.num_chained_rounds == 0 and not ss.block_loop.defer_read
    assert got.outputs() == seq.outputs() == host.outputs() and got.finished() == seq.finished()
    assert commits_by_request(gs) == commits_by_request(ss)


def test_chained_eager_rounds_equal_sequential_ones(runner, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CUDA_GRAPHS", "0")
    (got, gs), (seq, _) = chained_and_sequential(runner, reqs(max_tokens=13, ignore_eos=True), PARAMS[2])
    assert gs.block_loop.graphs is None and gs.num_chained_rounds > 0
    assert got.outputs() == seq.outputs()


def test_a_request_stopping_mid_chain_drops_its_chained_round_on_the_device(runner):
    full = run_dllm(runner, reqs(max_tokens=24, ignore_eos=True), PARAMS[2])[0].outputs()
    for extra in ({}, {"min_tokens": 11}):
        (got, gs), (seq, _) = chained_and_sequential(
            runner, reqs(max_tokens=24, stop_token_ids=[full["r1"][9]], **extra), PARAMS[2])
        assert gs.num_chained_rounds > 0
        assert got.outputs() == seq.outputs() and got.finished() == seq.finished()   # run_dllm: no page leaked


@pytest.mark.parametrize("which", ["llada", "sdar"])
def test_llada_and_sdar_chained_graph_rounds_equal_sequential_ones(which, llada_dir, sdar_dir):  # noqa: F811
    path = llada_dir if which == "llada" else sdar_dir
    runner = ModelRunner(ids_only(load_model("m", path, device="cuda")), 64, 4, "cuda", "float32",
                         max_decode_batch=4)
    requests = reqs(prompts=[[5, 9, 40, 3, 77], [1, 2, 3]], max_tokens=10, ignore_eos=True)
    for params in PARAMS[1:]:
        (got, gs), (seq, ss) = chained_and_sequential(runner, requests, params, spec=detect_spec(path))
        assert gs.num_chained_rounds > 0 and gs.block_loop.num_graph_steps > 0
        assert got.outputs() == seq.outputs() and commits_by_request(gs) == commits_by_request(ss)


@pytest.mark.parametrize("params", [PARAMS[1], PARAMS[2]])
def test_chained_rounds_never_sync_the_device_and_overlap_processing_at_batch_one(runner, params):
    """One request: round N+1 is launched before round N's processing (which waits for N's deferred
    read) ends, in nearly every pass; neither a synchronizing copy nor a stream or device sync."""
    syncs, caught = [], []
    _, sched = run_dllm(runner, reqs(prompts=PROMPTS[:1], max_tokens=40, ignore_eos=True), params, overlap=True,
                        block_loop=True, trace=True, during=lambda: no_sync_allowed(syncs, caught))
    assert not caught and not syncs and sched.num_chained_rounds >= sched.forward_ct - 2
    loop = sched.block_loop
    if params.algorithm == "fixed_steps":
        assert loop.num_host_reads == sched.forward_ct
    launched = {it: t0 for _, it, t0, _ in sched.executor.trace}
    assert sum(1 for _, it, _, p1 in sched.trace if launched.get(it + 1, p1) < p1) >= sched.forward_ct - 2
