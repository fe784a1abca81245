"""Prefill -> decode handoff with the real model and real data-plane sockets, in one process.

The router end of each worker's control socket is a QueueControl; everything else (model,
KV pages, kv_batch frames over ZeroMQ, schedulers and their loops) is the real thing.
"""
import re

import pytest

from cluster.config import SchedulerConfig
from cluster.sampling_params import SamplingParams
from cluster.unified import UnifiedScheduler
from cluster.wire import protocol as P
from decode_worker.scheduler import CORRUPT_KV_ENV
from tests.inprocess_workers import MAX_TOKENS, Pair, drain, run_unified, runner_for, step_all
from tests.overlap_handshake import ProcessingHandshake
from tests.queue_control import QueueControl

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def add(a, b):"]


def test_disaggregated_greedy_equals_unified(loaded):
    ref = run_unified(loaded, PROMPTS, overlap=False)
    assert run_unified(loaded, PROMPTS, overlap=True) == ref
    pair = Pair(loaded)
    for i, p in enumerate(PROMPTS):
        pair.submit(f"r{i}", p)
    try:
        assert pair.run(len(PROMPTS)) == ref
        assert pair.dc.errors() == [] and pair.pc.errors() == []
        assert len(pair.prefill.inflight_queue) == 0
        for runner in (pair.prefill.runner, pair.decode.runner):
            runner.page_allocator.check_integrity()
            assert runner.page_allocator.num_free_pages == runner.page_allocator.num_pages
    finally:
        pair.close()


def test_decode_receives_the_prompt_kv_and_runs_one_token_per_forward(loaded):
    pair = Pair(loaded)
    try:
        ids = pair.submit("r0", PROMPTS[0])
        pair.run(1)
        cfg = loaded.config
        expected = cfg.num_layers * 2 * len(ids) * cfg.num_kv_heads * cfg.head_dim * 4   # float32
        assert pair.decode.heartbeat_gauges().kv_transfer_bytes_total == expected
        assert pair.prefill.heartbeat_gauges().kv_transfer_bytes_total == expected
        seconds = pair.prefill.heartbeat_gauges().kv_transfer_seconds
        assert seconds.name == "kv_transfer_seconds" and seconds.count == 1
        assert pair.decode_forwards and all(lens == [1] for lens in pair.decode_forwards)
        assert ("prefill", 1) not in pair.decode.stats.reported_iters
    finally:
        pair.close()


def handed_off_tokens(loaded, prompt):
    pair = Pair(loaded)
    try:
        pair.submit("r0", prompt)
        return pair.run(1)["r0"]
    finally:
        pair.close()


def test_corrupted_kv_page_changes_the_output(loaded, monkeypatch):
    good = handed_off_tokens(loaded, PROMPTS[1])
    monkeypatch.setenv(CORRUPT_KV_ENV, "1")
    bad = handed_off_tokens(loaded, PROMPTS[1])
    assert good[0] == bad[0]        # the first token comes from prefill, before the handoff
    assert good != bad


def test_small_decode_pool_retracts_and_every_request_completes(loaded):
    ref = run_unified(loaded, PROMPTS[:3], overlap=True, max_tokens=16)
    pair = Pair(loaded, decode_pages=4)   # 3 requests need 6 pages at the end
    try:
        for i, p in enumerate(PROMPTS[:3]):
            pair.submit(f"r{i}", p, max_tokens=16)
        out = pair.run(3)
        assert pair.decode.decode.num_retracted_total >= 1
        assert out == ref
        assert set(pair.dc.finished().values()) == {"length"}
    finally:
        pair.close()


def test_retracted_request_keeps_its_original_sampling_and_reproduces_its_seeded_run(loaded):
    """A retracted request goes back to prefill (`reprefill`) with its original SamplingParams
    and the tokens so far: min_tokens counts those tokens, so EOS is allowed again at once when
    they already reach it, max_tokens is not extended, and a seeded request draws exactly what
    an unretracted run draws."""
    sampling = dict(max_tokens=16, min_tokens=4, temperature=0.8, seed=7)
    ref = run_unified(loaded, PROMPTS[:3], overlap=True, **sampling)
    pair = Pair(loaded, decode_pages=4)     # 3 requests need 6 pages at the end: retraction
    reprefills, prefill_rows = [], []
    send = pair.ddp.send_to
    pair.ddp.send_to = lambda addr, msg: (isinstance(msg, P.Reprefill) and reprefills.append(msg), send(addr, msg))[1]
    forward = pair.prefill.executor.forward_fn
    pair.prefill.executor.forward_fn = lambda fi: (prefill_rows.extend(
        zip(fi.prefix_lens, fi.extend_lens, fi.min_tokens_left)), forward(fi))[1]
    try:
        prompt_lens = {f"r{i}": len(pair.submit(f"r{i}", p, **sampling)) for i, p in enumerate(PROMPTS[:3])}
        out = pair.run(3)
        assert reprefills and pair.prefill.reqs == {} and pair.decode.decode.num_retracted_total >= 1
        for msg in reprefills:
            assert msg.sampling == SamplingParams(**sampling)  # the original, not a sum
            assert len(msg.output_ids) >= sampling["min_tokens"]   # the case the old wire got wrong
            # its re-prefill runs over prompt + sent tokens with EOS allowed (min_tokens met)
            assert (0, prompt_lens[msg.rid] + len(msg.output_ids), 0) in prefill_rows
        assert out == ref                                      # same tokens, same count
        assert all(len(out[r]) <= sampling["max_tokens"] for r in out)
    finally:
        pair.close()


def test_disaggregated_prefill_line_names_the_iteration_that_launched_it(loaded, caplog):
    pair = Pair(loaded, overlap=True)
    sent_iters = []
    send = pair.pdp.send_to
    pair.pdp.send_to = lambda addr, msg: (sent_iters.append(getattr(msg, "forward_iter", None)), send(addr, msg))[1]
    try:
        with caplog.at_level("INFO", logger="pdcluster.scheduler"):
            lasts = [None, None]
            for i, p in enumerate(PROMPTS):   # staggered: several prefill batches under overlap
                pair.submit(f"r{i}", p)
                for _ in range(3):
                    step_all([pair.prefill, pair.decode], lasts, True)
            pair.run(len(PROMPTS), lasts)
        iters = [int(m.group(1)) for r in caplog.records
                 if r.getMessage().startswith("Prefill batch") and (m := re.search(r"\[(\d+)\]", r.getMessage()))]
        assert len(iters) >= 2
        assert iters == sorted(set(iters))                      # strictly increasing, unique
        assert [i for i in sent_iters if i is not None] == iters  # the kv_batch carries the same iteration
    finally:
        pair.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_real_model_forward_overlaps_previous_result_processing(loaded, overlap):
    from tests.test_scheduler_iterations import overlap_fraction
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner_for(loaded), ctl)
    s.trace, s.executor.trace = [], []
    handshake = ProcessingHandshake(s)     # N+1's forward waits for N's processing: no race to lose
    for i, p in enumerate(PROMPTS):
        ctl.generate(f"r{i}", loaded.tokenizer.encode(p), max_tokens=MAX_TOKENS)
    drain([s], [None], lambda: len(ctl.finished()) == len(PROMPTS))
    frac = overlap_fraction(s.trace + s.executor.trace)
    assert handshake.timed_out == []
    assert frac == 1.0 if overlap else frac == 0.0, frac


def test_bad_generate_is_rejected_with_an_error_and_the_worker_keeps_serving(loaded):
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=True), "unified-0", runner_for(loaded), ctl)
    ctl.generate("bad-token", [loaded.config.vocab_size + 5], max_tokens=4)
    ctl.generate("ok", loaded.tokenizer.encode(PROMPTS[0]), max_tokens=4)
    ctl.generate("ok", loaded.tokenizer.encode(PROMPTS[0]), max_tokens=4)      # duplicate id
    drain([s], [None], lambda: "ok" in ctl.finished())
    reasons = {e.rid: e.reason for e in ctl.errors()}
    assert "out of range" in reasons["bad-token"]
    assert reasons["ok"] == "duplicate request id"
    assert len(ctl.outputs()["ok"]) == 4


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_n_siblings_fork_from_one_prefill_and_match_their_own_runs(loaded, prefix_cache):
    """n = 3 as one generate with two siblings: prefill runs the prompt once and sends its KV
    once; decode forks the siblings over it (shared whole pages with the prefix cache, copies
    without), each seeded seed + j, each drawing what it draws as a request of its own."""
    sampling = dict(max_tokens=8, temperature=0.8, seed=7)
    alone = Pair(loaded)                                         # n requests, batched alike
    try:
        for j in range(3):
            alone.submit(f"s{j}", PROMPTS[0], **{**sampling, "seed": 7 + j})
        ref = alone.run(3)
    finally:
        alone.close()
    pair = Pair(loaded)
    if prefix_cache:
        pair.decode.enable_prefix_cache()
    prefill_rows = []
    forward = pair.prefill.executor.forward_fn
    pair.prefill.executor.forward_fn = lambda fi: (prefill_rows.append(list(fi.extend_lens)), forward(fi))[1]
    try:
        ids = pair.tok.encode(PROMPTS[0])
        sp = SamplingParams(**sampling)
        pair.pc.inbound.put(P.Generate(rid="s0", input_ids=ids, sampling=sp, peer=P.Peer("decode-0", pair.ddp.address),
                                       siblings=["s1", "s2"]))
        pair.dc.inbound.put(P.Generate(rid="s0", input_ids=ids, sampling=sp, peer=P.Peer("prefill-0", pair.pdp.address),
                                       siblings=["s1", "s2"]))
        out = pair.run(3)
        assert out == ref
        assert prefill_rows == [[len(ids)]]                      # one prefill of the prompt
        cfg = loaded.config
        planes, kv_heads, kv_dim = cfg.kv_cache_shape   # K and V per head, or MLA's one latent
        one_prompt = cfg.num_layers * planes * len(ids) * kv_heads * kv_dim * 4
        assert pair.decode.heartbeat_gauges().kv_transfer_bytes_total == one_prompt
        assert pair.dc.errors() == [] and pair.decode.reqs == {}
        assert pair.decode.cache.token_usage == 0.0
        pair.decode.runner.page_allocator.check_integrity()
    finally:
        pair.close()


def test_aborting_one_sibling_frees_only_its_pages(loaded):
    pair = Pair(loaded)
    pair.decode.enable_prefix_cache()
    try:
        ids = pair.tok.encode(PROMPTS[1])
        sp = SamplingParams(max_tokens=24, temperature=0.8, seed=3, ignore_eos=True)
        for ctl, peer in ((pair.pc, P.Peer("decode-0", pair.ddp.address)), (pair.dc, P.Peer("prefill-0", pair.pdp.address))):
            ctl.inbound.put(P.Generate(rid="a0", input_ids=ids, sampling=sp, peer=peer, siblings=["a1", "a2"]))
        schedulers, lasts = [pair.prefill, pair.decode], [None, None]
        drain(schedulers, lasts, lambda: len(pair.dc.outputs().get("a1", [])) >= 3)
        pair.dc.inbound.put(P.Abort(rid="a1", reason="client went away"))
        drain(schedulers, lasts, lambda: {"a0", "a2"} <= set(pair.dc.finished()))
        finished = pair.dc.finished()
        assert finished["a0"] == finished["a2"] == "length" and len(pair.dc.outputs()["a2"]) == 24
        assert pair.decode.reqs == {} and pair.decode.cache.token_usage == 0.0
        pair.decode.runner.page_allocator.check_integrity()
    finally:
        pair.close()


# decode-side prefill: a prompt without a prefill peer rides in the decode steps, a page a step
LONG = ("A short story about a lighthouse keeper who counts the ships that pass by at night and "
        "writes each name in a book")


def test_decode_side_prefill_mixed_into_decode_steps_keeps_greedy_output_and_each_chunk_within_budget(
        loaded, caplog):
    prompts = ["The capital of France is", LONG]
    # a penalty: a decode row's prior ids in a mixed step end with its token still in flight
    ref = run_unified(loaded, prompts, overlap=False, max_tokens=6, repetition_penalty=1.3)
    pair = Pair(loaded)
    pair.decode.local_prefill.tpot = 1e-4       # no chunk fits: each step carries the one-page minimum
    try:
        pair.submit("r0", prompts[0], max_tokens=6, repetition_penalty=1.3)
        for _ in range(40):                      # decoding before the local prompt arrives
            pair.prefill.normal_step()
            pair.decode.normal_step()
            if len(pair.decode.decode):
                break
        ids = loaded.tokenizer.encode(LONG)
        pair.dc.generate("r1", ids, max_tokens=6, repetition_penalty=1.3)
        with caplog.at_level("INFO", logger="pdcluster.decode"):
            out = pair.run(2)
        assert out == ref
        mixed = [lens for lens in pair.decode_forwards if max(lens) > 1]      # decode steps are all ones
        assert mixed and all(lens[0] == 1 and lens[1] <= 16 for lens in mixed)   # the row, then the chunk
        lines = re.findall(r"Mixed step \[\d+\]: #decode-req: 1, #prefill-token: (\d+), chunk budget: (\d+)",
                           caplog.text)
        assert len(lines) == len(mixed) and all(int(t) <= int(b) == 16 for t, b in lines)
        gauges = pair.decode.heartbeat_gauges()
        assert gauges.decode_side_prefill_tokens_total == len(ids)
        assert gauges.num_queue_tokens == 0
        pair.decode.runner.page_allocator.check_integrity()
    finally:
        pair.close()
