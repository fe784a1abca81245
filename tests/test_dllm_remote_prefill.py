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
                 max_prefill_tokens=16):
        kv = KvTransferConfig(backend="zmq", verify=True, layerwise=layerwise)
        self.pc, self.dc = QueueControl(), QueueControl()
        pr, dr = runner_of(loaded), runner_of(dllm_loaded, fence=True)
        self.prefill = PrefillScheduler(SchedulerConfig(overlap=overlap, max_prefill_tokens=max_prefill_tokens),
                                        "prefill-0", pr, self.pc, KvHandoff.open("prefill-0", pr.kv_pool, kv),
                                        TimeoutsConfig())
        self.dllm = DllmScheduler(SchedulerConfig(overlap=overlap, max_prefill_tokens=64), "dllm-0", dr, self.dc,
                                  spec, params, handoff=KvHandoff.open("dllm-0", dr.kv_pool, kv, fence=dr.import_fence),
                                  timeouts=TimeoutsConfig())
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


@pytest.mark.parametrize("kind,block_size,layerwise", [("causal", 1, False), ("causal", 4, True),
                                                       ("sdar", 4, False), ("sdar", 3, True)])
def test_remote_prefill_answers_what_local_prefill_answers(loaded, dllm_loaded, kind, block_size, layerwise):
    spec, params = SPECS[kind], DllmParams(block_size=block_size, threshold=0.0)
    local = local_outputs(loaded, spec, params, PROMPTS, ignore_eos=True)
    pair = RemotePair(loaded, dllm_loaded, spec, params, layerwise=layerwise)
    try:
        for i, p in enumerate(PROMPTS):
            pair.submit(f"r{i}", p, ignore_eos=True)
        assert pair.run(len(PROMPTS)) == local
        # the DLLM worker computes blocks (and at most an aligned block's prompt tail), never a prompt
        assert max(max(r) for r in pair.dllm_rounds) <= 2 * block_size + spec.shift
        assert pair.pc.finished() == {}                  # the prefill worker streams no first token
    finally:
        pair.close()
