"""One process, real workers: prefill, decode and unified schedulers over the real model with
real data-plane sockets, the router end of each control socket a QueueControl, driven step by
step (for tests/test_handoff_inprocess.py and the tests that reuse its setup)."""
import time

from cluster.config import KvTransferConfig, SchedulerConfig, TimeoutsConfig
from cluster.engine.model_runner import ModelRunner
from cluster.kv_transfer import ImportFence
from cluster.runtime.kv_handoff import KvHandoff
from cluster.sampling_params import SamplingParams
from cluster.unified import UnifiedScheduler
from cluster.wire import protocol as P
from decode_worker.scheduler import DecodeScheduler
from prefill_worker.scheduler import PrefillScheduler
from tests.queue_control import QueueControl

MAX_TOKENS = 12


def step_all(schedulers, lasts, overlap):
    for i, s in enumerate(schedulers):
        if overlap:
            lasts[i] = s.overlap_step(lasts[i])
        else:
            s.normal_step()


def drain(schedulers, lasts, done, timeout=120):
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        step_all(schedulers, lasts, schedulers[0].config.overlap)
    assert done(), "requests did not finish in time"
    for i, (s, last) in enumerate(zip(schedulers, lasts)):   # process what is still in flight, once
        if last is not None:
            s._process(*last)
            lasts[i] = None


def runner_for(loaded, num_pages=256, import_fence=None, kv_dtype="auto"):
    weight = next(loaded.model.parameters())
    return ModelRunner(loaded, num_pages, 16, device=str(weight.device), dtype=weight.dtype,
                       import_fence=import_fence, kv_dtype=kv_dtype)


def serve(s, prompts, tag, max_tokens=8) -> dict[str, list[int]]:
    """Greedy ids of `prompts` (rids tag0, tag1, ...) served to the end by one in-process worker."""
    ctl = s.control
    for i, ids in enumerate(prompts):
        ctl.generate(f"{tag}{i}", ids, max_tokens=max_tokens, ignore_eos=True)
    drain([s], [None], lambda: all(f"{tag}{i}" in ctl.finished() for i in range(len(prompts))))
    assert ctl.errors() == []
    return {rid: t for rid, t in ctl.outputs().items() if rid.startswith(tag)}


def run_unified(loaded, prompts, overlap, max_tokens=MAX_TOKENS, kv_dtype="auto", **sampling):
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=overlap), "unified-0", runner_for(loaded, kv_dtype=kv_dtype), ctl)
    free_before = s.runner.page_allocator.num_free_pages    # CUDA graphs hold one scratch page
    for i, p in enumerate(prompts):
        ctl.generate(f"r{i}", loaded.tokenizer.encode(p), max_tokens=max_tokens, **sampling)
    drain([s], [None], lambda: len(ctl.finished()) == len(prompts))
    s.runner.page_allocator.check_integrity()
    assert s.runner.page_allocator.num_free_pages == free_before
    return ctl.outputs()


class Pair:
    """One prefill and one decode worker connected by real data planes."""

    def __init__(self, loaded, overlap=True, decode_pages=256, kv_dtype="auto"):
        self.pc, self.dc = QueueControl(), QueueControl()
        t = TimeoutsConfig()
        # whole-request handoff, checksummed: both workers share one model here, and a layer-wise
        # stream would hear the decode forwards' layers too (see test_kv_layerwise.py);
        # zmq, because `auto` picks cuda_ipc on a GPU and CUDA cannot open an IPC handle in the
        # process that exported it (both workers live in this one)
        kv = KvTransferConfig(backend="zmq", verify=True, layerwise=False)
        prefill_runner = runner_for(loaded, kv_dtype=kv_dtype)
        decode_runner = runner_for(loaded, decode_pages, ImportFence(next(loaded.model.parameters()).device), kv_dtype)
        self.prefill = PrefillScheduler(SchedulerConfig(overlap=overlap), "prefill-0", prefill_runner, self.pc,
                                        KvHandoff.open("prefill-0", prefill_runner.kv_pool, kv), t)
        self.decode = DecodeScheduler(SchedulerConfig(overlap=overlap), "decode-0", decode_runner, self.dc,
                                      KvHandoff.open("decode-0", decode_runner.kv_pool, kv,
                                                     fence=decode_runner.import_fence), t)
        self.pdp, self.ddp = self.prefill.handoff.data_plane, self.decode.handoff.data_plane
        self.decode_forwards: list = []
        forward = self.decode.executor.forward_fn
        self.decode.executor.forward_fn = lambda fi: (self.decode_forwards.append(list(fi.extend_lens)), forward(fi))[1]
        self.tok = loaded.tokenizer

    def submit(self, rid, prompt, max_tokens=MAX_TOKENS, **sampling):
        ids = self.tok.encode(prompt)
        sp = SamplingParams(max_tokens=max_tokens, **sampling)
        self.pc.inbound.put(P.Generate(rid=rid, input_ids=ids, sampling=sp, peer=P.Peer("decode-0", self.ddp.address)))
        self.dc.inbound.put(P.Generate(rid=rid, input_ids=ids, sampling=sp, peer=P.Peer("prefill-0", self.pdp.address)))
        return ids

    def run(self, n, lasts=None):
        schedulers = [self.prefill, self.decode]
        drain(schedulers, lasts or [None, None], lambda: len(self.dc.finished()) == n)
        deadline = time.monotonic() + 60              # let the last kv_acks reach prefill (a bound on a hang)
        while self.prefill.inflight_queue and time.monotonic() < deadline:
            self.prefill.recv_requests()
        return self.dc.outputs()

    def close(self):
        self.pdp.close()
        self.ddp.close()
