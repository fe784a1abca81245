"""Block rounds (dllm/block_loop.py: a round's blocks denoised to the end with the tensor-op commit
step) against per-forward rounds (host commits), on the CPU where both run eagerly: the same
tokens, the same commits step by step, the same KV policy for every model kind."""
import sys

import pytest

from cluster.dllm_params import DllmParams
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from dllm.model_spec import detect_spec
from tests.dllm_runs import reqs, run_dllm
from tests.test_dllm_models import llada_dir, sdar_dir  # noqa: F401  (fixtures)
from tests.triton_interpreter import interpreted_kernels

kernels = interpreted_kernels("triton_attention")


class IdsOnlyTokenizer:
    """These runs check token ids, never text: no tokenizer to load."""
    eos_token_ids = frozenset({2})

    def decode(self, ids, skip_special_tokens=True):
        return ""


def ids_only(loaded):
    loaded._tokenizer = IdsOnlyTokenizer()
    return loaded


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    return ModelRunner(ids_only(load_model("tiny", tiny_llama_dir, load_format="dummy")), num_pages=256, page_size=4)


def both(runner, requests, params, **kw):
    """(per-forward run, block-round run): their controls and schedulers."""
    return run_dllm(runner, requests, params, **kw), run_dllm(runner, requests, params, block_loop=True, **kw)


def commits_by_request(sched):
    out = {}
    for rid, _, start, length, positions in sched.commit_trace:
        out.setdefault(rid, []).append((start, length, positions))
    return out


@pytest.mark.parametrize("params", [DllmParams(block_size=1),
                                    DllmParams(block_size=4, threshold=0.003),
                                    DllmParams(block_size=8, threshold=0.0),
                                    DllmParams(block_size=3, algorithm="fixed_steps", steps_per_block=2),
                                    DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=4)])
def test_block_rounds_commit_exactly_what_per_forward_rounds_commit(runner, params):
    (ref, ref_sched), (got, sched) = both(runner, reqs(ignore_eos=True, logprobs=True), params)
    assert got.outputs() == ref.outputs() and got.finished() == ref.finished()
    assert commits_by_request(sched) == commits_by_request(ref_sched)
    assert sched.block_loop.num_eager_steps > 0 and sched.forward_ct <= ref_sched.forward_ct
    assert sched.heartbeat_gauges().dllm_tokens_per_forward == ref_sched.heartbeat_gauges().dllm_tokens_per_forward


def test_stop_ids_and_min_tokens_end_block_rounds_where_per_forward_rounds_end(runner):
    params = DllmParams(block_size=8, threshold=0.0)
    ref = run_dllm(runner, reqs(max_tokens=16, ignore_eos=True), params)[0].outputs()
    stop = ref["r1"][5]
    for extra in ({}, {"min_tokens": 7}):
        (a, _), (b, _) = both(runner, reqs(max_tokens=16, stop_token_ids=[stop], **extra), params)
        assert b.outputs() == a.outputs() and b.finished() == a.finished()


def test_a_chunked_long_prompt_answers_alike_in_block_rounds(runner):
    long_prompt = [(7 * j) % 400 + 3 for j in range(150)]      # chunks of 64 tokens: rounds without a block
    (a, _), (b, sched) = both(runner, reqs(prompts=[long_prompt, [5, 17, 33]], ignore_eos=True),
                              DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2))
    assert b.outputs() == a.outputs() and sched.block_loop.num_eager_steps > 0


def test_sampled_requests_keep_per_forward_rounds_with_the_block_loop_on(runner):
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    (a, _), (b, sched) = both(runner, reqs(temperature=0.8, seed=7, ignore_eos=True), params)
    assert a.outputs() == b.outputs() and sched.block_loop.num_eager_steps == 0


@pytest.mark.parametrize("which, params", [("llada", DllmParams(block_size=4, threshold=0.5)),
                                           ("sdar", DllmParams(block_size=4, algorithm="fixed_steps",
                                                               steps_per_block=2))])
def test_block_rounds_equal_per_forward_rounds_on_llada_and_sdar(which, params, llada_dir, sdar_dir):  # noqa: F811
    path = llada_dir if which == "llada" else sdar_dir
    runner = ModelRunner(ids_only(load_model("m", path)), num_pages=64, page_size=4)
    prompts = [[5, 9, 40, 3, 77], [1, 2, 3]]        # SDAR: the prompts' tails share the first block
    (a, sa), (b, sb) = both(runner, reqs(prompts=prompts, max_tokens=8, ignore_eos=True), params,
                            spec=detect_spec(path))
    assert b.outputs() == a.outputs() and commits_by_request(sb) == commits_by_request(sa)


@pytest.fixture
def interpreted_triton(kernels, monkeypatch):
    """Static block steps on the CPU: their attention through the interpreted Triton kernels."""
    import cluster.engine as engine
    monkeypatch.setitem(sys.modules, "cluster.engine.triton_attention", kernels)
    monkeypatch.setattr(engine, "triton_attention", kernels, raising=False)
    monkeypatch.setattr("dllm.block_loop.cuda_graphs_enabled", lambda device: True)


def static_layout_runs(runner, requests, every_params, spec=None) -> set:
    """Per params: per-forward rounds on the torch attention, then block rounds whose later steps
    run the graphs' static layout; -> the lead rooms those used."""
    refs = [run_dllm(runner, requests, params, spec=spec) for params in every_params]
    runner.attention_backend = "triton"
    leads = set()
    try:
        for params, (ref, ref_sched) in zip(every_params, refs):
            got, sched = run_dllm(runner, requests, params, spec=spec, block_loop=True)
            graphs = sched.block_loop.graphs
            runner.page_allocator.free([graphs.scratch_page])
            assert got.outputs() == ref.outputs() and commits_by_request(sched) == commits_by_request(ref_sched)
            assert sched.block_loop.num_graph_steps > 0
            leads |= {lead for _, lead in graphs.steps}
    finally:
        runner.attention_backend = "torch"
    return leads


def test_static_step_layout_of_the_cuda_graphs_commits_what_ragged_rounds_commit(runner, interpreted_triton):
    """The graphs' padded layout (block_graphs.py) run eagerly, its attention through the interpreted
    Triton extend kernel as on CUDA, against per-forward rounds on the CPU's torch attention."""
    requests = reqs(prompts=[[5, 17, 33], [9, 250, 3, 77, 44, 12]], max_tokens=8, ignore_eos=True)
    leads = static_layout_runs(runner, requests, [DllmParams(block_size=4, threshold=0.003),
                                                  DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)])
    assert leads == {1, 5}      # a block's first step (re-running the block before) and its later steps


def test_static_step_layout_keeps_sdars_aligned_blocks(sdar_dir, interpreted_triton):  # noqa: F811
    runner = ModelRunner(ids_only(load_model("m", sdar_dir)), num_pages=64, page_size=4)
    # first blocks of 3 and 1 (the prompts' tails share them), a last one cut short by max_tokens
    requests = reqs(prompts=[[5, 9, 40, 3, 77], [1, 2, 3]], max_tokens=7, ignore_eos=True)
    leads = static_layout_runs(runner, requests, [DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)],
                               spec=detect_spec(sdar_dir))
    assert leads == {0, 4}
