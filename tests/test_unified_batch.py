"""The unified worker at batch 64 (persistent decode rows, batch finish checks, packed tokens through the
wire codec) streams exactly the offline engine's greedy tokens."""
from __future__ import annotations

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from cluster.unified import UnifiedScheduler
from cluster.wire import protocol as P
from tests.queue_control import QueueControl
from tests.test_handoff_inprocess import drain, runner_for
from tests.xdist_lanes import lane_threads

BATCH = 64
MAX_TOKENS = 6


class CodecControl(QueueControl):
    """Every message the worker sends goes through encode and decode, as over the socket."""

    def send(self, msg) -> None:
        self.sent.append(P.decode(P.encode(msg)))


@pytest.fixture(scope="module")
def llm():
    torch.set_num_threads(lane_threads())
    return LLM()


def serve(llm, prompts, params: list[dict]):
    ctl = CodecControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=True, max_running_requests=len(prompts)), "unified-0",
                         runner_for(llm.loaded, num_pages=512), ctl)
    s.enable_prefix_cache()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ctl.generate(f"r{i}", llm.tokenizer.encode(p), **sp)
    return s, ctl


def test_unified_worker_at_batch_64_greedy_equals_offline_engine(llm):
    prompts = [f"Question {i}: what comes after {i * 7}?" for i in range(BATCH)]
    ref = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    s, ctl = serve(llm, prompts, [{"max_tokens": MAX_TOKENS}] * BATCH)
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


def test_rows_that_finish_otherwise_or_ask_for_more_equal_the_offline_engine(llm):
    """Stop token ids, stop strings, logprobs, min_tokens past EOS, seeded sampling and penalties beside
    plain greedy rows in one decode batch: each request's tokens, finish reason and logprobs as offline."""
    prompts = [f"List three {w}:" for w in ("colours", "fruits", "animals", "cities", "rivers", "tools")]
    first = llm.generate(prompts[:1], SamplingParams(max_tokens=4))[0].token_ids
    params = [{"max_tokens": 10, "stop_token_ids": [first[2]]},
              {"max_tokens": 10, "stop": [llm.tokenizer.decode(first[1:3])]},
              {"max_tokens": 7, "logprobs": True, "top_logprobs": 2},
              {"max_tokens": 9, "min_tokens": 6},
              {"max_tokens": 8, "temperature": 0.9, "seed": 11},
              {"max_tokens": 8, "repetition_penalty": 1.3, "presence_penalty": 0.4}]
    ref = llm.generate(prompts, [SamplingParams(**p) for p in params])
    s, ctl = serve(llm, prompts, params)
    drain([s], [None], lambda: len(ctl.finished()) == len(prompts))
    outputs, finished = ctl.outputs(), ctl.finished()
    logprobs = [lp for m in ctl.sent if isinstance(m, P.Tokens) for it in m.all_items()
                if it.rid == "r2" and it.logprobs for lp in it.logprobs]
    for i, r in enumerate(ref):
        assert outputs[f"r{i}"] == r.token_ids, params[i]
        assert finished[f"r{i}"] == r.finish_reason, params[i]
    assert logprobs == pytest.approx(ref[2].logprobs, abs=1e-4)
