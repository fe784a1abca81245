"""Chained block rounds (round_manager.py, carry.py): under overlap, a block round's next round is
launched from its tokens still on the device, before the host processed it. On the CPU (the block
loop run eagerly, and the CUDA graphs' static layout through the interpreted Triton kernels): the
same tokens and the same commits as block rounds launched one after the other, a request finishing
in round N drops what round N+1 made for it, and N's processing overlaps N+1's forward at batch 1."""
import threading
import time

import pytest

from cluster.config import SchedulerConfig
from cluster.dllm_params import DllmParams
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from dllm.model_spec import DllmModelSpec, detect_spec
from dllm.scheduler import DllmScheduler
from tests.dllm_runs import PLACEHOLDER, PROMPTS, chained_and_sequential, launched_before_processed, reqs, run_dllm
from tests.queue_control import QueueControl
from tests.test_dllm_block_loop import (commits_by_request, ids_only, interpreted_triton,  # noqa: F401 (fixtures)
                                        kernels)
from tests.test_dllm_models import llada_dir, sdar_dir  # noqa: F401  (fixtures)

PARAMS = [DllmParams(block_size=1),
          DllmParams(block_size=4, threshold=0.003),
          DllmParams(block_size=3, algorithm="fixed_steps", steps_per_block=2),
          DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)]


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    return ModelRunner(ids_only(load_model("tiny", tiny_llama_dir, load_format="dummy")), num_pages=256, page_size=4)


@pytest.mark.parametrize("params", PARAMS)
def test_chained_rounds_commit_exactly_what_sequential_block_rounds_commit(runner, params):
    (got, sched), (ref, ref_sched) = chained_and_sequential(runner, reqs(ignore_eos=True, logprobs=True), params)
    assert sched.num_chained_rounds > 0 and ref_sched.num_chained_rounds == 0
    assert got.outputs() == ref.outputs() and got.finished() == ref.finished()
    assert got.outputs() == run_dllm(runner, reqs(ignore_eos=True), params)[0].outputs()   # per-forward rounds
    assert commits_by_request(sched) == commits_by_request(ref_sched)
    logprobs = lambda control: {i.rid: i.logprobs for m in control.sent if hasattr(m, "all_items")  # noqa: E731
                                for i in m.all_items()}
    assert logprobs(got) == logprobs(ref)


def test_block_size_one_chained_equals_autoregressive_greedy(runner, tiny_llama_dir):
    from cluster.engine.llm import LLM
    from cluster.sampling_params import SamplingParams
    llm = LLM("tiny", tiny_llama_dir, load_format="dummy", num_pages=64, page_size=4)
    want = [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=11, ignore_eos=True))]
    control, sched = run_dllm(runner, reqs(ignore_eos=True), DllmParams(block_size=1), overlap=True, block_loop=True)
    assert sched.num_chained_rounds > 0
    assert [control.outputs()[f"r{i}"] for i in range(len(PROMPTS))] == want


def test_a_request_stopping_in_a_round_drops_the_chained_round_and_frees_its_pages(runner):
    """Stop ids and min_tokens end a request in round N while N+1 is in flight for it: the answer
    ends where sequential rounds end it, the others run on, and no page leaks (run_dllm checks)."""
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    full = run_dllm(runner, reqs(max_tokens=24, ignore_eos=True), params)[0].outputs()
    stop = full["r1"][9]
    for extra in ({}, {"min_tokens": 11}):
        (got, sched), (ref, _) = chained_and_sequential(runner, reqs(max_tokens=24, stop_token_ids=[stop], **extra),
                                                        params)
        assert got.outputs() == ref.outputs() and got.finished() == ref.finished()
        assert sched.num_chained_rounds > 0


def test_a_finished_requests_cached_kv_is_only_what_was_final_before_the_chained_round(tiny_llama_dir):
    """A request that stops while its chained round is in flight gives the prefix cache only KV final
    before that round (as many pages as without chaining): a follow-up prompt extending its answer
    from the cache answers as without the cache."""
    runner = ModelRunner(ids_only(load_model("tiny", tiny_llama_dir, load_format="dummy")), num_pages=256, page_size=4)
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    full = run_dllm(runner, reqs(prompts=[PROMPT], max_tokens=24, ignore_eos=True), params)[0].outputs()["r0"]
    # a block starts at 7 + 4j: the KV final before its chained round ends at 6 + 4j, inside a page
    # that the chained round fills; a stop anywhere in the block must not hand that page over
    stop = full[next(i for i in range(4, 24) if full[i] not in full[:i])]
    chained, sequential = (serve_in_turn(runner, params, chain, stop) for chain in (True, False))
    assert chained["num_chained_rounds"] > 0 and chained["hit_tokens"] > 0
    assert chained["cached_pages"] == sequential["cached_pages"] > 0
    fresh = run_dllm(runner, reqs(prompts=[chained["follow_up"]], max_tokens=12, ignore_eos=True),
                     params)[0].outputs()["r0"]
    assert chained["answer"] == sequential["answer"] == fresh


PROMPT = [5, 17, 33, 101, 7, 9, 250]


def serve_in_turn(runner, params, chain: bool, stop: int) -> dict:
    """Request `a` stopping at `stop`, then `b` extending `a`'s answer, on one prefix-cached worker."""
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=True, max_prefill_tokens=64), "dllm-0", runner, control,
                          DllmModelSpec.causal(PLACEHOLDER), params, block_loop=True, chain_rounds=chain)
    sched.enable_prefix_cache()
    loop = threading.Thread(target=sched.event_loop, daemon=True)
    loop.start()
    try:
        control.generate("a", PROMPT, max_tokens=24, stop_token_ids=[stop])
        wait_finished(control, 1)
        cached_pages = sched.cache.tree.num_evictable_pages
        follow_up = PROMPT + control.outputs()["a"] + [7, 8]
        control.generate("b", follow_up, max_tokens=12, ignore_eos=True)
        wait_finished(control, 2)
    finally:
        sched.stop()
        loop.join(timeout=30)
        sched.cache.drop_prefix_cache()
    return {"cached_pages": cached_pages, "follow_up": follow_up, "answer": control.outputs()["b"],
            "hit_tokens": sched.cache.num_hit_tokens, "num_chained_rounds": sched.num_chained_rounds}


def wait_finished(control: QueueControl, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(control.finished()) + len(control.errors()) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(control.finished()) == n, (control.finished(), control.errors())


def test_chained_rounds_overlap_processing_with_the_next_round_at_batch_one(runner):
    """Round N+1 is launched before round N is processed in nearly every pass with chaining,
    in none without it (one request: nothing else could fill the gap); every line names its launch."""
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    one = reqs(prompts=PROMPTS[:1], max_tokens=40, ignore_eos=True)
    (_, chained), (_, sequential) = chained_and_sequential(runner, one, params, trace=True)
    assert chained.forward_ct == sequential.forward_ct == 10
    assert launched_before_processed(chained) >= chained.forward_ct - 2
    assert launched_before_processed(sequential) == 0
    for sched in (chained, sequential):
        assert [it for _, it, _, _ in sched.trace] == list(range(1, sched.forward_ct + 1))
        assert sched.stats.reported_iters == [("prefill", i) for i in range(1, sched.forward_ct + 1)]
        assert sorted({c[1] for c in sched.commit_trace}) == list(range(1, sched.forward_ct + 1))


def test_prompt_chunks_and_sampled_requests_ride_beside_chained_rounds(runner):
    """A long prompt's chunks ride in chained rounds; a sampled request (per-forward rounds) holds the
    chain back until it is done; everything answers as without chaining."""
    params = DllmParams(block_size=4, threshold=0.003)
    long_prompt = [(7 * j) % 400 + 3 for j in range(150)]      # chunks of 64 tokens
    requests = reqs(prompts=PROMPTS + [long_prompt], max_tokens=40, ignore_eos=True)
    (got, sched), (ref, _) = chained_and_sequential(runner, requests, params)
    assert got.outputs() == ref.outputs() and sched.num_chained_rounds > 0
    sampled = reqs(max_tokens=40, ignore_eos=True) + [("s", [3, 4, 5], {"max_tokens": 9, "temperature": 0.7, "seed": 3, "ignore_eos": True}, {})]
    (got, sched), (ref, _) = chained_and_sequential(runner, sampled, params)
    assert got.outputs() == ref.outputs() and sched.num_chained_rounds > 0


@pytest.mark.parametrize("which", ["llada", "sdar"])
def test_chained_rounds_keep_llada_and_sdar_answers(which, llada_dir, sdar_dir):  # noqa: F811
    path = llada_dir if which == "llada" else sdar_dir
    runner = ModelRunner(ids_only(load_model("m", path)), num_pages=64, page_size=4)
    requests = reqs(prompts=[[5, 9, 40, 3, 77], [1, 2, 3]], max_tokens=10, ignore_eos=True)
    for params in PARAMS[1:]:
        (got, sched), (ref, ref_sched) = chained_and_sequential(runner, requests, params, spec=detect_spec(path))
        assert sched.num_chained_rounds > 0
        assert got.outputs() == ref.outputs() and commits_by_request(sched) == commits_by_request(ref_sched)


def test_chained_rounds_through_the_cuda_graphs_static_layout(runner, interpreted_triton):
    """The graphs' padded layout (block_graphs.py) run eagerly, its attention through the interpreted
    Triton extend kernel: carried ids land in the lead slots of a round's first and later steps."""
    requests = reqs(prompts=[[5, 17, 33], [9, 250, 3, 77, 44, 12]], max_tokens=10, ignore_eos=True)
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    ref, _ = run_dllm(runner, requests, params)
    runner.attention_backend = "triton"
    try:
        got, sched = run_dllm(runner, requests, params, overlap=True, block_loop=True)
        runner.page_allocator.free([sched.block_loop.graphs.scratch_page])
    finally:
        runner.attention_backend = "torch"
    assert sched.num_chained_rounds > 0 and sched.block_loop.num_graph_steps > 0
    assert got.outputs() == ref.outputs()


def test_the_environment_switch_turns_chaining_off(runner, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_DLLM_CHAIN", "0")
    _, sched = run_dllm(runner, reqs(ignore_eos=True), PARAMS[3], overlap=True, block_loop=True)
    assert not sched.chain_rounds and sched.num_chained_rounds == 0
