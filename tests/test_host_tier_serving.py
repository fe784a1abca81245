"""The host tier in real schedulers with the real model: a pool too small for the working set
sends turn 2 to the host tier (with the tier on) or to recomputation (off), and greedy output
is the cold run's either way (loads layer by layer too). They run the overlap loop (retractions under page pressure in
both loops); the references, the normal loop. The copies themselves are checked under overlap
ordering in test_host_tier.py (a load waits for the forward it was sealed for); that the tree
never takes a page a forward in flight still writes, in test_overlap_cache_pages.py."""
import pytest

from cluster.config import SchedulerConfig
from cluster.unified import UnifiedScheduler
from tests.inprocess_workers import Pair, runner_for
from tests.queue_control import QueueControl
from tests.test_prefix_cache import serve, submit_ids, turns

HOST_TIER_GB = 0.05          # 70 pages of the default model's float32 KV


def unified(loaded, host_tier_gb: float, num_pages: int, overlap: bool = True):
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner_for(loaded, num_pages), QueueControl())
    s.enable_prefix_cache(host_tier_gb)
    return s


def filler(tok) -> list[list[int]]:
    """Unrelated prompts that push turn 1's pages out of a small device pool."""
    return [tok.encode(f"Unrelated text {i}: the quick brown fox jumps over the lazy dog, twice or three "
                       f"times, then rests under a tree until the sun goes down.") for i in range(8)]


def check_tiers(s) -> None:
    tree = s.cache.tree
    tree.check_integrity()
    s.runner.page_allocator.check_integrity(held=[tree.pages()])
    if s.cache.host_tier is not None:
        s.cache.host_tier.allocator.check_integrity(held=[tree.host_pages()])


def three_turns(s, first, second, others) -> list[dict]:
    return [serve(s, first, "a"), serve(s, others, "b"), serve(s, second, "c")]


@pytest.fixture(scope="module")
def cold(loaded):
    """Turn 1, fillers, turn 2 in a pool that never evicts: the reference output."""
    first, second = turns(loaded.tokenizer)
    return three_turns(unified(loaded, 0, 256, overlap=False), first, second, filler(loaded.tokenizer))


def test_turn_two_hits_the_host_tier_and_greedy_output_equals_a_cold_run(loaded, cold):
    first, second = turns(loaded.tokenizer)
    others, ref = filler(loaded.tokenizer), cold
    off = unified(loaded, 0, 12)
    assert three_turns(off, first, second, others) == ref
    on = unified(loaded, HOST_TIER_GB, 12)
    assert three_turns(on, first, second, others) == ref
    by_tier = on.heartbeat_gauges().prefix_cache_hit_tokens_total
    assert by_tier["host"] == on.cache.num_host_hit_tokens >= sum(len(ids) // 16 * 16 for ids in first) // 2
    assert off.heartbeat_gauges().prefix_cache_hit_tokens_total["host"] == 0
    assert sum(by_tier.values()) > off.cache.num_hit_tokens               # off recomputed what on loaded
    gauges = on.heartbeat_gauges()
    assert gauges.host_tier_bytes_total["to_host"] > 0
    assert gauges.host_tier_bytes_total["to_device"] == by_tier["host"] // 16 * on.cache.host_tier.page_bytes
    assert 0 < gauges.host_tier_usage <= 1
    check_tiers(on)


def test_layer_by_layer_loads_give_the_cold_run_output(loaded, cold):
    """Every host-tier load forced layer by layer: each layer's pages are copied right before the
    layer runs (on the forward thread, under overlap)."""
    first, second = turns(loaded.tokenizer)
    on = unified(loaded, HOST_TIER_GB, 12)
    on.cache.host_tier.layerwise_min_bytes = 0
    assert three_turns(on, first, second, filler(loaded.tokenizer)) == cold
    assert on.cache.host_tier.num_layerwise_loads > 0 and on.cache.num_host_hit_tokens > 0
    check_tiers(on)


def test_recomputing_when_the_cost_model_says_loading_is_slower(loaded, cold):
    first, second = turns(loaded.tokenizer)
    others, ref = filler(loaded.tokenizer), cold
    on = unified(loaded, HOST_TIER_GB, 12)
    on.cache.host_tier.cost.copy_bytes_per_s = 1.0                        # a very slow tier
    assert three_turns(on, first, second, others) == ref
    assert on.cache.num_host_hit_tokens == 0 and on.cache.host_tier.bytes_to_device == 0
    check_tiers(on)


def retraction_waves(tok) -> list[list[list[int]]]:
    first, second = turns(tok)
    return [first + second + [ids[:40] + tok.encode(" Say hi.") for ids in first], filler(tok), second]


@pytest.fixture(scope="module")
def retraction_reference(loaded):
    """The waves' output in a pool that never retracts: one reference for both loops."""
    waves = retraction_waves(loaded.tokenizer)
    return [serve(unified(loaded, 0, 256, overlap=False), p, f"w{i}-") for i, p in enumerate(waves)]


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_retractions_under_page_pressure_with_the_host_tier_keep_output_and_tiers_consistent(
        loaded, retraction_reference, overlap):
    waves, ref = retraction_waves(loaded.tokenizer), retraction_reference
    small = unified(loaded, HOST_TIER_GB, 10, overlap)
    assert [serve(small, p, f"w{i}-") for i, p in enumerate(waves)] == ref
    assert small.decode.num_retracted_total > 0 and small.cache.num_host_hit_tokens > 0
    check_tiers(small)


def test_disaggregated_prefill_loads_turn_two_from_its_host_tier(loaded, cold):
    first, second = turns(loaded.tokenizer)
    others, ref = filler(loaded.tokenizer), cold
    pair = Pair(loaded)
    pair.prefill.enable_prefix_cache(HOST_TIER_GB)
    pair.decode.enable_prefix_cache(HOST_TIER_GB)
    try:
        held = pair.prefill.runner.page_allocator.allocate(256 - 16)       # leave the prefill pool 16 pages
        out, done = [], 0
        for tag, prompts in zip("abc", (first, others, second)):
            for i, ids in enumerate(prompts):
                submit_ids(pair, f"{tag}{i}", ids)
            done += len(prompts)
            got = pair.run(done)
            out.append({k: v for k, v in got.items() if k.startswith(tag)})
        assert out == ref
        assert pair.prefill.cache.num_host_hit_tokens > 0
        pair.prefill.runner.page_allocator.free(held)
        assert pair.dc.errors() == [] and pair.pc.errors() == []
    finally:
        pair.close()
