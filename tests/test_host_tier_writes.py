"""The host tier's write-backs: which evicted pages it writes (host_tier_policy.WritePolicy), what
they cost on the scheduler's path (one host eviction per device eviction, one copy per run), the
order between a write-back's gather and the next writer of its device pages, and the prefill
timing of the cost model without a wait. CUDA tests run only where a GPU is."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cluster.engine.host_tier import HostTier
from cluster.engine.host_tier_policy import WritePolicy
from cluster.engine.kv_cache import KVPool
from cluster.engine.page_allocator import PageAllocator
from cluster.engine.radix_cache import RadixCache, RadixNode
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams
from tests.host_tier_harness import PAGE, check, compute, manager

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def serve(cm, ids: list[int]) -> Req:
    req = Req(f"r{serve.n}", ids, SamplingParams())
    serve.n += 1
    cm.match_prefix(req)
    cm.grow(req, req.seq_len)
    compute(cm, req)
    cm.release(req)
    return req


serve.n = 0


def unique_prompts(cm, count: int, pages: int = 3, first: int = 1000) -> None:
    for i in range(count):
        serve(cm, [first + i] * (pages * PAGE) + [7])


def test_without_reuse_the_tier_turns_selective_after_a_window_and_writes_few_pages():
    cm = manager(num_pages=8, host_pages=48)
    policy = cm.host_tier.policy
    assert policy.window == 64 and not policy.selective
    unique_prompts(cm, 40)                        # 120 pages evicted, none ever loaded
    assert policy.selective and policy.num_skipped > 0
    written = cm.host_tier.bytes_to_host // cm.host_tier.page_bytes
    before = written
    unique_prompts(cm, 40, first=5000)
    written = cm.host_tier.bytes_to_host // cm.host_tier.page_bytes
    assert written - before <= 120 // 4           # about 1 / SAMPLE of what was offered, whole prefixes
    check(cm, [])


def test_multi_turn_reuse_keeps_every_page_written():
    """Turn k + 1 extends turn k's prompt and answer, which were never hit before their eviction."""
    cm = manager(num_pages=10, host_pages=256)
    cm.host_tier.policy.window = 16
    convs = [[100 + c] * (3 * PAGE) for c in range(6)]
    for turn in range(5):
        for c, ids in enumerate(convs):
            req = serve(cm, ids + [1])
            convs[c] = req.all_ids[:(len(ids) // PAGE + 1) * PAGE] + [200 + turn] * PAGE
    policy = cm.host_tier.policy
    assert cm.num_host_hit_tokens > 0 and not policy.selective and policy.num_skipped == 0
    check(cm, [])


def test_selective_writes_keep_a_reused_page_and_sampled_prefixes_whole():
    tree = RadixCache(PageAllocator(8), PAGE, PageAllocator(8), lambda dev, host: None,
                      should_write=WritePolicy(8).wants)
    policy = tree.should_write.__self__
    policy.selective = True
    keys = [k for k in range(200) if hash((k, k)) % policy.sample]       # prefixes not sampled
    sampled = next(k for k in range(200) if hash((k, k)) % policy.sample == 0)
    for k in (keys[0], keys[1], sampled):
        tree.insert([k] * 4, tree.allocate(2))
    tree.match_prefix([keys[1]] * 2 + [9])        # its first page is reused
    tree.evict(6)
    kept = {}
    for n in tree._nodes():
        kept[n.key[0]] = max(kept.get(n.key[0], 0), n.depth)
    assert keys[0] not in kept and kept[keys[1]] == 1 and kept[sampled] == 2
    tree.check_integrity()


def test_a_selective_tier_writes_every_page_again_once_its_sampled_writes_are_loaded():
    policy = WritePolicy(host_pages=64)
    root = RadixNode((), -1, None)
    prefixes = [RadixNode((k, k), k, root) for k in range(64)]
    assert all(policy.wants(n) for n in prefixes)             # the first window writes everything
    assert not policy.wants(next(n for n in prefixes if hash(n.key) % policy.sample))   # no loads: selective
    assert policy.selective
    written = sum(policy.wants(n) for n in prefixes[1:])
    assert 0 < written < 64 // 2
    policy.on_load(written)                                   # the sampled prefixes came back
    policy.wants(prefixes[0])
    assert not policy.selective and all(policy.wants(n) for n in prefixes[1:])   # to the window's end
    unadaptive = WritePolicy(host_pages=64, adaptive=False)
    assert all(unadaptive.wants(n) for n in prefixes * 3) and not unadaptive.selective


def test_a_device_eviction_evicts_the_host_tier_once():
    cm = manager(num_pages=8, host_pages=6, adaptive=False)
    calls = []
    evict_host = cm.tree.evict_host
    cm.tree.evict_host = lambda n: calls.append(n) or evict_host(n)
    unique_prompts(cm, 2)                         # 6 pages on the device, the host tier empty
    cm.tree.evict(6)                              # the host takes all six
    unique_prompts(cm, 2, first=3000)
    cm.tree.evict(6)                              # six more: the host tier full, one eviction of six
    assert calls == [6] and cm.tree.num_host_pages == 6
    check(cm, [])


def test_a_write_back_issues_one_copy_per_run_of_host_pages():
    tier = HostTier(KVPool(32, 1, 2, 10, PAGE), 12)           # the layers of an 8B model
    kv = tier.pool.kv
    kv.copy_(torch.randn(kv.shape))
    tier.write([0, 1, 2, 3, 4, 5], [6, 7, 8, 2, 3, 10])      # runs 2-3, 6-8, 10
    assert tier.num_write_copies == 3
    assert torch.equal(tier.kv[:, [6, 7, 8, 2, 3, 10]], kv[:, :, :, :6].permute(0, 3, 1, 2, 4, 5))


def test_a_deferred_prefill_is_timed_once_read_without_waiting_for_it():
    tier = HostTier(KVPool(2, 1, 2, 4, PAGE), 4)
    outs = [SimpleNamespace(ready=object(), timings={}) for _ in range(3)]   # deferred reads, not landed
    fi = SimpleNamespace(is_decode=False, extend_lens=[300, 100])
    run = tier.wrap_forward(lambda fi: outs.pop(0))
    out = run(fi)
    assert tier.cost.prefill_tokens_per_s is None
    out.timings["step_s"], out.ready = 0.1, None              # the scheduler's ForwardOutput.wait
    run(SimpleNamespace(is_decode=True, extend_lens=[1]))
    run(fi)                                                   # the next prefill feeds the earlier one
    assert tier.cost.prefill_tokens_per_s == pytest.approx(4000)


def cuda_tier(layers: int = 4, pages: int = 16) -> HostTier:
    pool = KVPool(layers, 2, 8, pages, PAGE, dtype=torch.bfloat16, device="cuda")
    pool.kv.copy_(torch.randn(pool.kv.shape, device="cuda"))
    return HostTier(pool, pages)


@cuda
@pytest.mark.parametrize("two_d", [True, False])
def test_cuda_write_back_lands_every_layer_of_fragmented_runs(two_d, monkeypatch):
    if not two_d:
        monkeypatch.setattr("cluster.kv_transfer.cuda_memcpy.memcpy_2d", lambda *a: False)
    tier = cuda_tier()
    want = tier.pool.kv[:, :, :, [3, 1, 4, 9, 2]].permute(0, 3, 1, 2, 4, 5).cpu()
    tier.write([3, 1, 4, 9, 2], [5, 6, 7, 0, 12])
    torch.cuda.synchronize()
    assert torch.equal(tier.kv[:, [5, 6, 7, 0, 12]], want)
    assert tier.num_write_copies == (3 if two_d else 3 * 4)


@cuda
@pytest.mark.parametrize("writer", ["caller", "forward", "import"])
def test_cuda_a_device_page_is_written_again_only_after_its_gather(writer):
    """The gather is held back on its stream; the next writer of the page must wait for it."""
    tier = cuda_tier()
    other = torch.cuda.Stream()
    tier.reusers.append(other)
    want = tier.pool.kv[:, :, :, [2, 5]].permute(0, 3, 1, 2, 4, 5).cpu()
    with torch.cuda.stream(tier.gather_stream):
        torch.cuda._sleep(200_000_000)                        # ~0.1 s: the gather starts late
    tier.write([2, 5], [0, 1])
    if writer == "caller":                                    # the scheduler's own stream
        tier.pool.kv[:, :, :, [2, 5]] = -1
    else:
        stream = torch.cuda.Stream() if writer == "forward" else other
        with torch.cuda.stream(stream):
            if writer == "forward":
                tier.flush()                                  # what the forward thread runs first
            tier.pool.kv[:, :, :, [2, 5]] = -1
    torch.cuda.synchronize()
    assert torch.equal(tier.kv[:, [0, 1]], want)


@cuda
def test_cuda_a_host_page_written_then_loaded_comes_back():
    tier = cuda_tier()
    want = tier.pool.kv[:, :, :, [6, 7]].clone()
    tier.write([6, 7], [3, 4])
    tier.pool.kv[:, :, :, [6, 7]] = 0
    tier.load([3, 4], [10, 11])
    tier.seal(1)
    tier.launching(1)
    tier.flush()
    torch.cuda.synchronize()
    assert torch.equal(tier.pool.kv[:, :, :, [10, 11]], want)


@cuda
def test_cuda_a_decode_workers_import_stream_waits_for_write_backs():
    """attach_host_tier registers the import fence's stream, where KV imports into freed pages run."""
    from cluster.engine.host_tier import attach_host_tier
    from cluster.kv_transfer.base import ImportFence
    pool = cuda_tier().pool
    fence = ImportFence(torch.device("cuda"))
    runner = SimpleNamespace(kv_pool=pool, followers=None, import_fence=fence, add_layer_gate=lambda gate: None)
    executor = SimpleNamespace(forward_fn=lambda fi: None, on_launch=None)
    tier = attach_host_tier(executor, runner, 1e-5)
    with fence.stream():
        assert tier.reusers == [torch.cuda.current_stream()]
