"""The unified worker at batch 64 (persistent decode rows, batch finish checks, packed tokens through the
wire codec) streams exactly the offline engine's greedy tokens."""
from __future__ import annotations

import torch

from cluster.config import SchedulerConfig
from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from cluster.unified import UnifiedScheduler
from cluster.wire import protocol as P
from tests.queue_control import QueueControl
from tests.test_handoff_inprocess import drain, runner_for

BATCH = 64
MAX_TOKENS = 6


class CodecControl(QueueControl):
    """Every message the worker sends goes through encode and decode, as over the socket."""

    def send(self, msg) -> None:
        self.sent.append(P.decode(P.encode(msg)))


def test_unified_worker_at_batch_64_greedy_equals_offline_engine():
    torch.set_num_threads(2)
    llm = LLM()
    prompts = [f"Question {i}: what comes after {i * 7}?" for i in range(BATCH)]
    ref = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    ctl = CodecControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=True, max_running_requests=BATCH), "unified-0",
                         runner_for(llm.loaded, num_pages=512), ctl)
    s.enable_prefix_cache()
    for i, p in enumerate(prompts):
        ctl.generate(f"r{i}", llm.tokenizer.encode(p), max_tokens=MAX_TOKENS)
    decode_sizes = []
    schedule = s.decode.schedule

    def recording_schedule():
        batch = schedule()
        if batch is not None:
            decode_sizes.append(batch.batch_size)
        return batch
    s.decode.schedule = recording_schedule
    drain([s], [None], lambda: len(ctl.finished()) == BATCH)
    outputs, finished = ctl.outputs(), ctl.finished()
    assert max(decode_sizes) == BATCH
    for i, r in enumerate(ref):
        assert outputs[f"r{i}"] == r.token_ids, prompts[i]
        assert finished[f"r{i}"] == r.finish_reason, prompts[i]
    assert s.reqs == {} and not ctl.errors()
