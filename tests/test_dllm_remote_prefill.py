"""DLLM requests prefilled remotely, in one process: a real prefill worker and a real DLLM worker
over real data planes (zmq, layer-wise and whole), a tiny random Llama, driven step by step.
A remote prefill must answer exactly what the DLLM worker answers prefilling locally, for causal
and block-causal (SDAR-style, aligned blocks) visibility, and the prefix cache must keep
block-causal KV apart from causal KV of the same tokens."""
from __future__ import annotations

import pytest

from cluster.config import KvTransferConfig, SchedulerConfig, TimeoutsConfig
from cluster.dllm_params import DllmParams
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.kv_transfer import ImportFence
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.kv_handoff import KvHandoff
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol as P
from dllm.model_spec import DllmModelSpec
from dllm.scheduler import DllmScheduler
from prefill_worker.scheduler import PrefillScheduler
from tests.dllm_runs import PLACEHOLDER, run_dllm
from tests.inprocess_workers import drain
from tests.queue_control import QueueControl

PAGE = 4
LONG = [(7 * i + 3) % 200 + 5 for i in range(37)]       # spans chunks and several pages
PROMPTS = [[5, 17, 33, 101, 7, 9, 250, 3], LONG, [300, 301, 44]]
SPECS = {"causal": DllmModelSpec.causal(PLACEHOLDER), "sdar": DllmModelSpec.sdar(PLACEHOLDER)}


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_model("tiny", tiny_llama_dir, load_format="dummy")


@pytest.fixture(scope="module")
def dllm_loaded(tiny_llama_dir):
    """The same seeded weights again: a layer-wise stream listens to its model's layers, so the
    DLLM worker's forwards must not run on the prefill worker's model object."""
    return load_model("tiny", tiny_llama_dir, load_format="dummy")


def runner_of(loaded, fence=False):
    return ModelRunner(loaded, num_pages=256, page_size=PAGE,
                       import_fence=ImportFence(next(loaded.model.parameters()).device) if fence else None)


class RemotePair:
    """A prefill worker and a DLLM worker that takes its prompts' KV."""

    def __init__(self, loaded, dllm_loaded, spec, params, overlap=True, layerwise=False, prefix_cache=False,
                 max_prefill_tokens=16, block_loop=False):
        kv = KvTransferConfig(backend="zmq", verify=True, layerwise=layerwise)
        self.pc, self.dc = QueueControl(), QueueControl()
        pr, dr = runner_of(loaded), runner_of(dllm_loaded, fence=True)
        self.prefill = PrefillScheduler(SchedulerConfig(overlap=overlap, max_prefill_tokens=max_prefill_tokens),
                                        "prefill-0", pr, self.pc, KvHandoff.open("prefill-0", pr.kv_pool, kv),
                                        TimeoutsConfig())
        self.dllm = DllmScheduler(SchedulerConfig(overlap=overlap, max_prefill_tokens=64), "dllm-0", dr, self.dc,
                                  spec, params, handoff=KvHandoff.open("dllm-0", dr.kv_pool, kv, fence=dr.import_fence),
                                  timeouts=TimeoutsConfig(), block_loop=block_loop)
        if prefix_cache:
            self.prefill.enable_prefix_cache()
            self.dllm.enable_prefix_cache()
        self.dllm_rounds: list = []                      # per DLLM round: its requests' extend lens
        build = self.dllm.build_forward_input
        self.dllm.build_forward_input = lambda b: (self.dllm_rounds.append(list(b.extend_lens)), build(b))[1]

    def submit(self, rid, ids, **sampling):
        sp = SamplingParams(**{"max_tokens": 9, **sampling})
        self.pc.inbound.put(P.Generate(rid=rid, input_ids=list(ids), sampling=sp,
                                       peer=P.Peer("dllm-0", self.dllm.handoff.address)))
        self.dc.inbound.put(P.Generate(rid=rid, input_ids=list(ids), sampling=sp,
                                       peer=P.Peer("prefill-0", self.prefill.handoff.address)))

    def run(self, n):
        drain([self.prefill, self.dllm], [None, None], lambda: len(self.dc.finished()) + len(self.dc.errors()) >= n)
        assert self.dc.errors() == [] and self.pc.errors() == []
        return self.dc.outputs()

    def close(self):
        for s in (self.prefill, self.dllm):
            s.handoff.close()


def local_outputs(loaded, spec, params, prompts, **sampling):
    control, _ = run_dllm(runner_of(loaded), [(f"r{i}", p, {"max_tokens": 9, **sampling}, {})
                                              for i, p in enumerate(prompts)], params, spec=spec)
    return control.outputs()


@pytest.mark.parametrize("kind,block_size,layerwise,block_loop", [
    ("causal", 1, False, False), ("causal", 4, True, False), ("sdar", 4, False, False), ("sdar", 3, True, False),
    ("sdar", 4, False, True)])          # blocks filled to the end per round (the CUDA loop, eager here)
def test_remote_prefill_answers_what_local_prefill_answers(loaded, dllm_loaded, kind, block_size, layerwise,
                                                           block_loop):
    spec, params = SPECS[kind], DllmParams(block_size=block_size, threshold=0.0)
    local = local_outputs(loaded, spec, params, PROMPTS, ignore_eos=True)
    pair = RemotePair(loaded, dllm_loaded, spec, params, layerwise=layerwise, block_loop=block_loop)
    try:
        for i, p in enumerate(PROMPTS):
            pair.submit(f"r{i}", p, ignore_eos=True)
        assert pair.run(len(PROMPTS)) == local
        # the DLLM worker computes blocks (and at most an aligned block's prompt tail), never a prompt
        assert max(max(r) for r in pair.dllm_rounds) <= 2 * block_size + spec.shift
        assert pair.pc.finished() == {}                  # the prefill worker streams no first token
        assert not block_loop or pair.dllm.block_loop.num_eager_steps > 0
    finally:
        pair.close()


# ---- prefix cache: block-causal KV of the same tokens is another entry ----------------------
def cached_req(rid, ids, attn_block=0) -> Req:
    req = Req(rid, ids, SamplingParams(max_tokens=4))
    req.dllm_attn_block = attn_block
    return req


def test_block_causal_kv_is_cached_apart_from_causal_kv_and_matched_in_whole_blocks(loaded):
    cache = CacheManager(runner_of(loaded).page_allocator, PAGE)
    cache.enable_prefix_cache()
    ids = list(range(10, 10 + 25))
    for attn_block in (0, 8):                    # the same 24 tokens cached as causal and as 8-blocks
        req = cached_req(f"w{attn_block}", ids, attn_block)
        cache.grow(req, len(ids))
        req.kv_len = len(ids)
        cache.release(req)
    assert cache.match_prefix(cached_req("c", ids)) == 24                      # causal: its own 6 pages
    assert cache.match_prefix(cached_req("d", ids, attn_block=1)) == 24        # causal DLLM KV is the same KV
    assert cache.match_prefix(cached_req("b", ids, attn_block=8)) == 24        # 8-blocks: 3 whole blocks
    diverged = ids[:12] + [999] * 13             # shares 3 pages, but only one whole 8-block
    assert cache.match_prefix(cached_req("e", diverged, attn_block=8)) == 8
    assert cache.match_prefix(cached_req("f", ids, attn_block=4)) == 0          # 4-blocks: nothing cached
    cache.tree.check_integrity()


def test_a_repeated_prompt_is_served_from_both_prefix_caches_with_the_same_answer(loaded, dllm_loaded):
    spec, params = SPECS["sdar"], DllmParams(block_size=4, threshold=0.0)
    local = local_outputs(loaded, spec, params, [LONG], ignore_eos=True)["r0"]
    pair = RemotePair(loaded, dllm_loaded, spec, params, prefix_cache=True)
    held = []
    send = pair.dllm.handoff.send_to
    pair.dllm.handoff.send_to = lambda addr, msg: (
        held.append(msg.held_len) if isinstance(msg, P.DecodeReady) else None, send(addr, msg))[1]
    try:
        for turn in range(2):
            pair.submit(f"t{turn}", LONG, ignore_eos=True)
            assert pair.run(turn + 1)[f"t{turn}"] == local
        # turn 1 found the prompt's whole blocks in the DLLM worker's cache: that KV did not travel
        assert held[0] == 0 and held[1] >= 32
        assert pair.prefill.cache.num_hit_tokens >= 32       # and in the prefill worker's (block-causal) cache
    finally:
        pair.close()


def test_under_overlap_the_kv_names_the_prefill_iteration_that_launched_the_prompt(loaded, dllm_loaded):
    spec, params = SPECS["sdar"], DllmParams(block_size=4, threshold=0.0)
    pair = RemotePair(loaded, dllm_loaded, spec, params, overlap=True)
    launched, received = {}, {}                  # rid -> prefill forward_iter of its last chunk / of its KV
    run = pair.prefill.run_batch

    def run_batch(batch):
        future = run(batch)
        launched.update({r.rid: batch.forward_iter for r, last in zip(batch.reqs, batch.is_last_chunk) if last})
        return future
    pair.prefill.run_batch = run_batch
    land = pair.dllm.reception.land_batch
    pair.dllm.reception.land_batch = lambda msg, *a: (received.update({r.rid: msg.forward_iter for r in msg.reqs}),
                                                      land(msg, *a))[1]
    try:
        for i, p in enumerate(PROMPTS):
            pair.submit(f"r{i}", p, ignore_eos=True)
        pair.run(len(PROMPTS))
        assert received == launched and len(set(launched.values())) >= 2   # LONG is chunked: a later batch
    finally:
        pair.close()
