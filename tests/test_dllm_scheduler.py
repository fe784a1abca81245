"""DllmScheduler driven in-process: a real ModelRunner on a tiny random Llama, fed through a
queue pair (tests/queue_control.py) the way the router feeds a worker."""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import replace

import pytest
import torch

from cluster.wire import protocol as P
from cluster.runtime.cache_manager import CacheManager
from cluster.config import SchedulerConfig
from cluster.engine.llm import LLM
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import ForwardMode, Req
from dllm.model_spec import DllmModelSpec
from cluster.dllm_params import DllmParams
from dllm.round_manager import DllmReq, RoundManager
from dllm.scheduler import DllmScheduler
from tests.dllm_runs import PLACEHOLDER, PROMPTS, launched_before_processed, reqs, run_dllm
from tests.engine_fixtures import TINY_VOCAB
from tests.queue_control import QueueControl


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    return ModelRunner(load_model("tiny", tiny_llama_dir, load_format="dummy"), num_pages=256, page_size=4)


# ---- invariants -------------------------------------------------------------------
@pytest.mark.parametrize("params", [DllmParams(block_size=4, threshold=0.0),
                                    DllmParams(block_size=8, threshold=0.003),
                                    DllmParams(block_size=3, algorithm="fixed_steps", steps_per_block=2)])
def test_answers_grow_left_to_right_in_the_active_block_to_exactly_max_tokens(runner, params):
    requests = reqs(ignore_eos=True)
    control, sched = run_dllm(runner, requests, params)
    outputs = control.outputs()
    for rid, prompt, sampling, _ in requests:
        assert len(outputs[rid]) == sampling["max_tokens"] and control.finished()[rid] == "length"
        commits = [c for c in sched.commit_trace if c[0] == rid]
        filled: dict[int, set] = {}
        expected_start = len(prompt)
        for _, _, start, length, positions in commits:
            assert positions and all(0 <= j < length for j in positions), "a commit left the active block"
            if start not in filled:                              # a new block opens where the last ended
                assert start == expected_start
                expected_start = start + length
                filled[start] = set()
            assert max(filled) == start, "an older block was touched"
            assert not filled[start] & set(positions), "a position was committed twice"
            filled[start] |= set(positions)
        assert expected_start == len(prompt) + sampling["max_tokens"]
    assert sched.reqs == {} and len(sched.rounds) == 0


def test_prompt_is_never_modified_and_streamed_blocks_are_the_output(runner):
    seen = {}

    def check(batch, fi):
        for req in batch.reqs:
            seen.setdefault(req.rid, tuple(req.input_ids))
            assert req.input_ids == seen[req.rid]
        return fi
    requests = reqs(ignore_eos=True)
    control, _ = run_dllm(runner, requests, DllmParams(block_size=4, threshold=0.0), on_forward=check)
    for rid, prompt, _, _ in requests:
        assert seen[rid] == tuple(prompt)
    token_msgs = [m for m in control.sent if isinstance(m, P.Tokens)]   # request marks travel too
    assert token_msgs
    for msg in token_msgs:
        for item in msg.items:
            assert 1 <= len(item.token_ids) <= 4   # one message item per finished block


def test_fixed_steps_commit_the_planned_count_each_step(runner):
    params = DllmParams(block_size=8, algorithm="fixed_steps", steps_per_block=3)
    _, sched = run_dllm(runner, reqs(max_tokens=13, ignore_eos=True), params)
    per_block: dict[tuple, list[int]] = {}
    for rid, _, start, length, positions in sched.commit_trace:
        per_block.setdefault((rid, start, length), []).append(len(positions))
    for (_, _, length), counts in per_block.items():
        assert counts == {8: [3, 3, 2], 5: [2, 2, 1]}[length]
    assert sched.heartbeat_gauges().dllm_forwards_per_block == pytest.approx(3.0)
    assert sched.heartbeat_gauges().dllm_tokens_per_forward == pytest.approx(13 / 6)


def test_mask_token_never_comes_out(runner):
    # pick a "mask" token the model likes: the first greedy token of the first prompt
    control, _ = run_dllm(runner, reqs(prompts=PROMPTS[:1], max_tokens=1, ignore_eos=True))
    favourite = control.outputs()["r0"][0]
    spec = DllmModelSpec("sdar", favourite, shifted=True, block_attention=False, aligned_blocks=False)
    control, _ = run_dllm(runner, reqs(ignore_eos=True), DllmParams(block_size=4, threshold=0.0), spec=spec)
    for out in control.outputs().values():
        assert favourite not in out and len(out) == 11


def test_eos_inside_a_block_ends_the_request_there(runner):
    control, _ = run_dllm(runner, reqs(max_tokens=16, ignore_eos=True), DllmParams(block_size=8, threshold=0.0))
    out = control.outputs()["r1"]
    stop = out[5]                     # make the 6th token a stop id: the request must end there
    control, _ = run_dllm(runner, reqs(max_tokens=16, stop_token_ids=[stop]), DllmParams(block_size=8, threshold=0.0))
    got = control.outputs()["r1"]
    assert got == out[:out.index(stop) + 1] and control.finished()["r1"] == "stop"


@pytest.mark.parametrize("split", [False, True])
def test_greedy_runs_are_deterministic_and_a_request_alone_equals_it_in_a_batch(runner, split):
    params = DllmParams(block_size=4, threshold=0.003)
    batched = run_dllm(runner, reqs(ignore_eos=True), params)[0].outputs()
    again = run_dllm(runner, reqs(ignore_eos=True), params, overlap=True, split=split)[0].outputs()
    assert batched == again
    for i, prompt in enumerate(PROMPTS):
        alone = run_dllm(runner, reqs(prompts=[prompt], ignore_eos=True), params)[0].outputs()["r0"]
        assert alone == batched[f"r{i}"]


def test_seeded_temperature_runs_repeat(runner):
    params = DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    a = run_dllm(runner, reqs(temperature=0.8, seed=7, ignore_eos=True), params)[0].outputs()
    b = run_dllm(runner, reqs(prompts=PROMPTS[::-1], temperature=0.8, seed=7, ignore_eos=True), params,
                 overlap=True)[0].outputs()
    assert [a[f"r{i}"] for i in range(3)] == [b[f"r{2 - i}"] for i in range(3)]


def test_per_request_overrides_win_over_group_defaults(runner):
    requests = [("r0", PROMPTS[0], {"max_tokens": 8, "ignore_eos": True}, {"block_size": 8, "threshold": 0.0}),
                ("r1", PROMPTS[1], {"max_tokens": 8, "ignore_eos": True}, {})]
    _, sched = run_dllm(runner, requests, DllmParams(block_size=2, threshold=0.0))
    lens = {rid: {length for r, _, _, length, _ in sched.commit_trace if r == rid} for rid in ("r0", "r1")}
    assert lens == {"r0": {8}, "r1": {2}}


def test_bad_override_fails_only_that_request(runner):
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=False), "dllm-0", runner, control, DllmModelSpec.causal(0))
    control.inbound.put(P.Generate(rid="bad", input_ids=[5, 6], sampling=SamplingParams(),
                                   dllm={"algorithm": "nope"}))
    sched.recv_requests()
    assert [e.rid for e in control.errors()] == ["bad"] and sched.reqs == {}


# ---- block size 1 is autoregressive greedy decoding -------------------------------------
@pytest.mark.parametrize("overlap", [False, True])
def test_block_size_one_reproduces_autoregressive_greedy(runner, tiny_llama_dir, overlap):
    forwards = []

    def record(batch, fi):
        forwards.append((batch.mode, fi))
        return fi
    control, _ = run_dllm(runner, reqs(max_tokens=12), DllmParams(block_size=1), overlap=overlap,
                          on_forward=record)
    llm = LLM("tiny", tiny_llama_dir, load_format="dummy", num_pages=64, page_size=4)
    ar = llm.generate(PROMPTS, SamplingParams(max_tokens=12))
    outputs = control.outputs()
    assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == [o.token_ids for o in ar]
    # the same masked-block loop as any block size: never a decode forward
    for mode, fi in forwards:
        assert mode == ForwardMode.DLLM and fi.return_logits and not any(fi.sample) and not fi.is_decode
        ends = [sum(fi.extend_lens[:i + 1]) - 1 for i in range(fi.num_reqs)]
        assert all(int(fi.input_ids[e]) == PLACEHOLDER for e in ends)


# ---- iteration identity under overlap ---------------------------------------------------
LINE = re.compile(r"Prefill batch \[(\d+)\]")


def test_dllm_lines_carry_the_launching_iteration_under_overlap(runner, caplog):
    caplog.set_level(logging.INFO, logger="pdcluster.scheduler")
    control, sched = run_dllm(runner, reqs(prompts=PROMPTS + [[4, 4, 4]], ignore_eos=True),
                              DllmParams(block_size=4, threshold=0.003), overlap=True, trace=True, split=True)
    iters = [int(m.group(1)) for r in caplog.records if (m := LINE.search(r.getMessage()))]
    launched = [it for kind, it, _, _ in sched.executor.trace]
    assert iters == sorted(set(iters)), "iterations must be strictly increasing and unique"
    assert iters == launched == list(range(1, sched.forward_ct + 1))
    assert [it for _, it, _, _ in sched.trace] == iters
    assert all(c[1] in launched for c in sched.commit_trace)
    # real overlap: round N+1 is in flight before round N is processed
    assert launched_before_processed(sched) >= len(iters) // 2


def test_merged_groups_under_overlap_keep_one_round_in_flight(runner):
    """split off: every running request rides in every round, rounds never overlap each other."""
    control, sched = run_dllm(runner, reqs(ignore_eos=True), DllmParams(block_size=4, threshold=0.003),
                              overlap=True, trace=True, split=False)
    by_iter: dict[int, set] = {}
    for rid, it, *_ in sched.commit_trace:
        by_iter.setdefault(it, set()).add(rid)
    rounds = [by_iter[it] for it in sorted(by_iter)]
    assert rounds[0] == {"r0", "r1", "r2"}
    assert all(a >= b for a, b in zip(rounds, rounds[1:])), "a round left out a running request"
    forward = {it: t0 for _, it, t0, _ in sched.executor.trace}
    assert all(forward[it + 1] >= p1 for _, it, _, p1 in sched.trace if it + 1 in forward)
    assert sched.stats.reported_iters == [("prefill", i) for i in range(1, sched.forward_ct + 1)]


def test_a_long_prompt_is_chunked_and_answers_like_an_unchunked_one(runner):
    long_prompt = [(7 * i + 3) % TINY_VOCAB for i in range(150)]
    params = DllmParams(block_size=4, threshold=0.003)
    chunked = run_dllm(runner, reqs(prompts=[long_prompt, PROMPTS[0]], ignore_eos=True), params)[0].outputs()
    control = QueueControl()
    whole = DllmScheduler(SchedulerConfig(overlap=False, max_prefill_tokens=4096), "dllm-0", runner, control,
                          DllmModelSpec.causal(PLACEHOLDER), params)
    control.inbound.put(P.Generate(rid="r0", input_ids=long_prompt,
                                   sampling=SamplingParams(max_tokens=11, ignore_eos=True)))
    while not control.finished():
        whole.normal_step()
    assert control.outputs()["r0"] == chunked["r0"] and len(chunked["r0"]) == 11


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_mid_answer_frees_the_request_and_spares_the_others(runner, overlap):
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=overlap), "dllm-0", runner, control,
                          DllmModelSpec.causal(PLACEHOLDER), DllmParams(block_size=2, threshold=0.0))
    free_before = runner.page_allocator.num_free_pages
    long, short = SamplingParams(max_tokens=200, ignore_eos=True), SamplingParams(max_tokens=30, ignore_eos=True)
    control.inbound.put(P.Generate(rid="long", input_ids=PROMPTS[0], sampling=long))
    control.inbound.put(P.Generate(rid="short", input_ids=PROMPTS[1], sampling=short))
    send, aborted = control.send, []

    def send_then_abort(msg) -> None:
        # NOTE: the client goes away on the scheduler thread, as long's 4th token leaves: a test thread
        # polling for it could wake on loaded cores only after long's 200 tokens (100 tiny rounds)
        send(msg)
        if not aborted and len(control.outputs().get("long", [])) >= 4:
            aborted.append(True)
            control.inbound.put(P.Abort(rid="long", reason="client went away"))
    control.send = send_then_abort
    loop = threading.Thread(target=sched.event_loop, daemon=True)
    loop.start()
    deadline = time.monotonic() + 60
    while "short" not in control.finished() and time.monotonic() < deadline:
        time.sleep(0.002)
    while "long" in sched.reqs and time.monotonic() < deadline:
        time.sleep(0.002)
    sched.stop()
    loop.join(timeout=30)
    assert len(control.outputs()["short"]) == 30 and "long" not in control.finished()
    assert 4 <= len(control.outputs()["long"]) < 200
    assert sched.reqs == {} and runner.page_allocator.num_free_pages == free_before


def test_worker_build_registers_the_groups_served_name(tmp_path, tiny_llama_dir):
    from cluster.config import load_config
    from dllm.__main__ import build
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nname = "tiny"\npath = "{tiny_llama_dir}"\nload_format = "dummy"\n'
                   '[[unified]]\ncount = 1\n'
                   '[[dllm]]\ncount = 1\nmodel = "tiny-dllm"\nblock_size = 4\nalgorithm = "fixed_steps"\n'
                   'steps_per_block = 2\nmask_token_id = 7\n')
    config = load_config(str(cfg))
    group = config.group_of("dllm-0")
    runner = ModelRunner(load_model("tiny", tiny_llama_dir, load_format="dummy"), num_pages=16, page_size=4)

    class Args:
        worker_id = "dllm-0"
    sched, register = build(Args, config, group, runner, QueueControl())
    assert register == {"model": "tiny-dllm"}
    assert sched.params == DllmParams(block_size=4, algorithm="fixed_steps", steps_per_block=2)
    assert sched.spec == DllmModelSpec.causal(7)


def test_stop_string_ends_the_answer_mid_block(runner):
    params = DllmParams(block_size=8, threshold=0.0)
    full = run_dllm(runner, reqs(prompts=PROMPTS[1:2], max_tokens=16, ignore_eos=True), params)[0].outputs()["r0"]
    decode = runner.tokenizer.decode
    k = next(i for i in range(3, 16) if decode(full[i:i + 1]).strip())
    stop = decode(full[k:k + 1]).strip()
    control, _ = run_dllm(runner, reqs(prompts=PROMPTS[1:2], max_tokens=16, ignore_eos=True, stop=[stop]), params)
    got = control.outputs()["r0"]
    first = next(i for i in range(16) if stop in decode(full[:i + 1]))
    assert got == full[:first + 1] and control.finished()["r0"] == "stop"


def test_a_request_that_can_never_fit_fails_with_a_reason(runner):
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=False), "dllm-0", runner, control, DllmModelSpec.causal(0))
    control.inbound.put(P.Generate(rid="huge", input_ids=[5, 6], sampling=SamplingParams(max_tokens=5000)))
    sched.recv_requests()
    assert sched.get_next_batch_to_run() is None
    assert [e.rid for e in control.errors()] == ["huge"] and "pages" in control.errors()[0].reason
    assert sched.reqs == {} and len(sched.rounds.waiting) == 0


def test_round_returns_only_block_rows_and_they_equal_the_full_logits(runner):
    """A round asks for `len(block) + shift` rows per request (0 for a prompt chunk); its block
    logits equal the matching rows of a forward that returns every extend row."""
    def no_fail(req, why):
        raise AssertionError(why)

    rounds = RoundManager(CacheManager(runner.page_allocator, 4), DllmModelSpec.causal(PLACEHOLDER), 8, 15, no_fail)
    for rid, prompt in [("a", PROMPTS[0]), ("b", list(range(100, 130)))]:
        rounds.add(DllmReq(Req(rid, prompt, SamplingParams(max_tokens=4)), DllmParams(block_size=4)))
    batch = rounds.schedule()
    assert batch.extend_lens == [9, 6] and batch.is_last_chunk == [True, False]   # prompt + block, prompt chunk
    fi = rounds.forward_input(batch)
    assert fi.logits_lens == [4 + 1, 0]
    kept = runner.forward(fi).logits
    full = runner.forward(replace(fi, logits_lens=[])).logits
    assert kept.shape == (5, TINY_VOCAB) and full.shape == (15, TINY_VOCAB)
    block, chunk = rounds.block_logits(batch, kept)
    assert chunk is None
    torch.testing.assert_close(block, full[9 - 4 - 1:9 - 1], atol=1e-5, rtol=1e-5)
    for state in list(rounds.running.values()):
        rounds.remove(state.req.rid)
        runner.page_allocator.free(state.req.page_table)
