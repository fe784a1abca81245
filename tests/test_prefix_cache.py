"""Prefix cache in real schedulers with the real model: reuse never changes greedy output.

Turn 1 fills the radix cache; turn 2 re-sends the shared system prompt (and a whole earlier
turn) and must extend from the cached pages, with the same tokens as a cold run.
"""
import re

import pytest

from cluster.config import SchedulerConfig
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol as P
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import Pair, drain, runner_for, serve
from tests.queue_control import QueueControl

SYSTEM = ("You are a helpful assistant. Answer in one short sentence, politely, and never "
          "mention that you are a language model. Keep answers factual and brief. ")
QUESTIONS = ["What is the capital of France?", "Name a large ocean.", "How many legs has a cat?"]
MAX_TOKENS = 8


def turns(tok) -> tuple[list[list[int]], list[list[int]]]:
    """Turn-1 prompts (system + question) and turn-2 prompts (turn 1, an answer, a follow-up)."""
    first = [tok.encode(SYSTEM + q) for q in QUESTIONS]
    second = [ids + tok.encode(" Paris is nice. And why is that so?") for ids in first]
    return first, second


def unified(loaded, prefix_cache: bool, num_pages: int = 256):
    s = UnifiedScheduler(SchedulerConfig(overlap=True), "unified-0", runner_for(loaded, num_pages), QueueControl())
    if prefix_cache:
        s.enable_prefix_cache()
    return s


def submit_ids(pair, rid, ids) -> None:
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    pair.pc.inbound.put(P.Generate(rid=rid, input_ids=ids, sampling=sp, peer=P.Peer("decode-0", pair.ddp.address)))
    pair.dc.inbound.put(P.Generate(rid=rid, input_ids=ids, sampling=sp, peer=P.Peer("prefill-0", pair.pdp.address)))


def check_pages(s) -> None:
    """Every page is free, or cached in the tree, and the tree's counters agree."""
    tree = s.cache.tree
    tree.check_integrity()
    s.runner.page_allocator.check_integrity(held=[tree.pages()])
    assert tree.num_evictable_pages == tree.num_cached_pages   # nothing live references a page


def test_unified_greedy_output_with_cache_hits_equals_cold_output(loaded, caplog):
    first, second = turns(loaded.tokenizer)
    cold = unified(loaded, prefix_cache=False)
    ref = [serve(cold, first[:1], "a"), serve(cold, first[1:], "b"), serve(cold, second, "c")]
    warm = unified(loaded, prefix_cache=True)
    with caplog.at_level("INFO", logger="pdcluster.scheduler"):
        assert serve(warm, first[:1], "a") == ref[0]
        assert serve(warm, first[1:], "b") == ref[1]
        hits_turn1 = warm.cache.num_hit_tokens
        assert serve(warm, second, "c") == ref[2]
    # turn 1: later requests share the system prompt's whole pages; turn 2: whole turns
    assert hits_turn1 >= 2 * (len(loaded.tokenizer.encode(SYSTEM)) // 16 * 16)
    assert warm.cache.num_hit_tokens - hits_turn1 >= sum(len(ids) // 16 * 16 for ids in first)
    logged = sum(int(m.group(1)) for r in caplog.records
                 if (m := re.search(r"^Prefill batch \[\d+\].*#cached-token: (\d+)", r.getMessage())))
    assert logged == warm.cache.num_hit_tokens
    assert warm.heartbeat_gauges().prefix_cache_hit_rate == pytest.approx(warm.cache.hit_rate)
    assert warm.cache.hit_rate > 0.3
    check_pages(warm)


def test_eviction_under_page_pressure_keeps_every_live_request_correct(loaded):
    """A pool of 10 pages: every turn evicts cached pages of earlier ones, while four
    requests run at once (some retracted and re-prefilled from what is still cached)."""
    first, second = turns(loaded.tokenizer)
    tok = loaded.tokenizer
    other = [tok.encode(f"Unrelated text {i}: the quick brown fox jumps over the lazy dog, twice or "
                        f"three times, then rests under a tree until the sun goes down.") for i in range(3)]
    waves = [first + second + [ids[:40] + tok.encode(" Say hi.") for ids in first], other]
    cold = unified(loaded, prefix_cache=False)
    ref = [serve(cold, prompts, f"w{i}-") for i, prompts in enumerate(waves)]
    small = unified(loaded, prefix_cache=True, num_pages=10)
    evicted = []
    evict = small.cache.tree.evict
    small.cache.tree.evict = lambda n: (evicted.append(n), evict(n))[1]
    assert [serve(small, prompts, f"w{i}-") for i, prompts in enumerate(waves)] == ref
    assert evicted and small.cache.num_hit_tokens > 0 and small.decode.num_retracted_total > 0
    check_pages(small)


def test_prefill_worker_extends_from_cached_prefix_and_decode_output_is_unchanged(loaded):
    first, second = turns(loaded.tokenizer)
    ref = serve(unified(loaded, prefix_cache=False), second, "r")
    pair = Pair(loaded)
    pair.prefill.enable_prefix_cache()
    try:
        submit_ids(pair, "warm", first[0])
        pair.run(1)
        for i, ids in enumerate(second):
            submit_ids(pair, f"r{i}", ids)
        out = pair.run(1 + len(second))
        assert {k: v for k, v in out.items() if k != "warm"} == ref
        assert pair.prefill.cache.num_hit_tokens >= len(first[0]) // 16 * 16
        by_tier = pair.prefill.heartbeat_gauges().prefix_cache_hit_tokens_total
        assert by_tier == {"device": pair.prefill.cache.num_hit_tokens, "host": 0}
        check_pages(pair.prefill)
    finally:
        pair.close()


def test_decode_prefills_a_short_uncached_remainder_itself_from_what_it_finished(loaded):
    """Selective disaggregation: turn 1 goes through prefill -> decode; turn 2 reaches the
    decode worker alone (no prefill peer) and extends from turn 1's KV that decode kept."""
    first, _ = turns(loaded.tokenizer)
    pair = Pair(loaded)
    pair.prefill.enable_prefix_cache()
    pair.decode.enable_prefix_cache()
    try:
        submit_ids(pair, "t1", first[0])
        answer = pair.run(1)["t1"]
        turn2 = first[0] + answer + loaded.tokenizer.encode(" Tell me more.")
        ref = serve(unified(loaded, prefix_cache=False), [turn2], "r")["r0"]
        sent_before = pair.prefill.heartbeat_gauges().kv_transfer_bytes_total
        pair.dc.generate("t2", turn2, max_tokens=MAX_TOKENS, ignore_eos=True)   # no peer: prefill here
        out = pair.run(2)
        assert out["t2"] == ref
        assert pair.decode.cache.num_hit_tokens >= (len(first[0]) + MAX_TOKENS - 1) // 16 * 16
        assert pair.prefill.heartbeat_gauges().kv_transfer_bytes_total == sent_before   # nothing crossed
        assert pair.dc.errors() == []
        check_pages(pair.decode)
    finally:
        pair.close()


def test_decode_side_reuse_transfers_only_the_pages_decode_does_not_hold(loaded):
    """Turn 2 of a conversation goes prefill -> decode again: decode still holds turn 1's
    prompt and answer, says so in decode_ready, and only the rest of the KV travels."""
    first, _ = turns(loaded.tokenizer)
    pair = Pair(loaded)
    pair.prefill.enable_prefix_cache()
    pair.decode.enable_prefix_cache()
    cfg = loaded.config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4          # float32
    try:
        submit_ids(pair, "t1", first[0])
        answer = pair.run(1)["t1"]
        assert pair.decode.heartbeat_gauges().kv_transfer_bytes_total == per_token * len(first[0])
        turn2 = first[0] + answer + loaded.tokenizer.encode(" Tell me more.")
        ref = serve(unified(loaded, prefix_cache=False), [turn2], "r")["r0"]
        before = {s: s.heartbeat_gauges().kv_transfer_bytes_total for s in (pair.prefill, pair.decode)}
        submit_ids(pair, "t2", turn2)
        out = pair.run(2)
        assert out["t2"] == ref
        held = pair.decode.cache.num_hit_tokens
        assert held >= (len(first[0]) + MAX_TOKENS - 1) // 16 * 16 and held % 16 == 0
        for s in (pair.prefill, pair.decode):
            assert s.heartbeat_gauges().kv_transfer_bytes_total - before[s] == per_token * (len(turn2) - held)
        assert pair.dc.errors() == [] and pair.pc.errors() == []
        check_pages(pair.decode)
    finally:
        pair.close()


def test_an_aborted_request_drops_its_references_and_keeps_only_its_prefilled_prompt_pages(loaded):
    """Its prompt's pages joined the cache when its prefill ended (their forward returned); the
    pages its decode steps wrote go back to the pool."""
    first, second = turns(loaded.tokenizer)
    s = unified(loaded, prefix_cache=True)
    ref = serve(unified(loaded, prefix_cache=False), [second[1]], "r")["r0"]
    serve(s, first[:1], "warm")
    gone = second[0] + loaded.tokenizer.encode(" Please answer at length, with many examples.")
    ctl = s.control
    ctl.generate("gone", gone, max_tokens=MAX_TOKENS, ignore_eos=True)
    ctl.generate("r0", second[1], max_tokens=MAX_TOKENS, ignore_eos=True)
    last = None
    for _ in range(3):                                  # both prefilled (on the cached prefix), decoding
        last = s.overlap_step(last)
    assert s.cache.tree.num_evictable_pages < s.cache.tree.num_cached_pages   # referenced while live
    ctl.inbound.put(P.Abort(rid="gone", reason="client went away"))
    drain([s], [last], lambda: "r0" in ctl.finished())
    assert ctl.outputs()["r0"] == ref
    # the finished request's pages joined the cache; of the aborted one's, only its prompt's
    assert len(s.cache.tree.match_prefix(gone)[0]) == len(gone) // 16
    assert len(s.cache.tree.match_prefix(gone + ctl.outputs().get("gone", []))[0]) == len(gone) // 16
    assert len(s.cache.tree.match_prefix(second[1])[0]) == len(second[1]) // 16
    check_pages(s)
