"""Host µs per decode step: the worker's Python around a forward that costs nothing.

    python benchmarks/host_path.py [--batches 1 64 256] [--steps 100] [--repeats 5]
                                   [--fake forward|model] [--profile [N]] [--loop overlap|normal]

What runs is the real unified worker (`UnifiedScheduler`: prefill and decode managers, cache
manager with the prefix cache on, batch builder, output processor with its stop checks, stats
lines with logging off, request marks) over a real `ModelRunner`, fed through a control socket
stand-in whose `send` encodes every message with the real wire codec (`protocol.encode`, the
msgpack `tokens` message included). The only fake part is the forward:

- `--fake forward` (default): `ModelRunner.forward` returns at once with a plausible output
  (one sampled id per request, stored into the future map as the real one does). What is timed
  is the scheduler thread's work per step.
- `--fake model`: the runner's own forward runs (future resolution, attention metadata,
  sampling, the host copies); only the network is fake: it returns preallocated hidden states
  and 64-wide logits. That adds the forward thread's host work (on CUDA much of it is a graph
  replay instead; see the decode-graph fill).

B requests with ~130-token prompts are admitted, prefilled, then decoded with `ignore_eos`
and no length limit; after they all decode, `--steps` steady decode steps are timed
`--repeats` times (overlap loop on by default) and the median µs per step is printed, wall time
and the process's CPU time (all threads; steadier than wall time on a machine shared with others).
`--profile N` prints cProfile's top N functions of the scheduler thread for the largest batch
(with `--loop normal` the forward runs on that thread too, so it is profiled as well).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import random
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster.config import SchedulerConfig  # noqa: E402
from cluster.engine.forward_batch import ForwardInput, ForwardOutput  # noqa: E402
from cluster.engine.loader import LoadedModel, load_model  # noqa: E402
from cluster.engine.model_files import load_tokenizer  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.unified import UnifiedScheduler  # noqa: E402
from cluster.wire import protocol as P  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

PROMPT_LEN = 130
PAGE_SIZE = 16
FAKE_VOCAB = 64             # --fake model: width of the logits the fake network returns


class EncodingControl(QueueControl):
    """The router end of the control socket: every message the worker sends is encoded with the
    wire codec (as the socket thread would), then dropped."""

    def __init__(self):
        super().__init__()
        self.bytes_sent = 0

    def send(self, msg) -> None:
        self.bytes_sent += sum(len(f) for f in P.encode(msg))


class ZeroCostModel:
    """Stands in for the network under `--fake model`: no compute, outputs of the right shapes."""

    def __init__(self, hidden_size: int, max_tokens: int):
        self.hidden = torch.zeros(max_tokens, hidden_size)
        self.logits = torch.zeros(max_tokens, FAKE_VOCAB)
        self.logits[:, 7] = 1.0           # every row's argmax is token 7

    def __call__(self, input_ids, positions, kv_caches, ctx):
        return self.hidden[:input_ids.numel()]

    def compute_logits(self, hidden, upcast: bool = True):
        return self.logits[:hidden.shape[0]]


def zero_cost_forward(runner: ModelRunner, token: int = 7):
    """`ModelRunner.forward` that returns at once: `token` for every sampled row, stored into the
    request's future slot like the real forward, so overlap's future tokens resolve."""
    def forward(fi: ForwardInput, wait: bool = True) -> ForwardOutput:
        if fi.is_decode:                      # every row samples
            ids = torch.full((fi.num_reqs,), token, dtype=torch.int64)
            runner.store_future(fi.future_slots, ids)
            return ForwardOutput(next_token_ids=ids)
        rows = [i for i, s in enumerate(fi.sample) if s]
        ids = torch.full((fi.num_reqs,), -1, dtype=torch.int64)
        ids[rows] = token
        if fi.future_slots:
            runner.store_future([fi.future_slots[i] for i in rows], ids[rows])
        return ForwardOutput(next_token_ids=ids)
    return forward


def tiny_model(tokenizer) -> LoadedModel:
    """A real one-layer dummy model (the runner builds its KV pool from it) with the default vocabulary."""
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": tokenizer.vocab_size, "hidden_size": 64,
          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
          "head_dim": 8, "eos_token_id": sorted(tokenizer.eos_token_ids)}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(hf, f)
        loaded = load_model("dummy", path=d, load_format="dummy")
    loaded._tokenizer = tokenizer
    return loaded


def build_worker(batch: int, num_tokens: int, fake: str, overlap: bool) -> tuple[UnifiedScheduler, EncodingControl]:
    tokenizer = load_tokenizer()
    loaded = tiny_model(tokenizer)
    config = loaded.config
    num_pages = batch * (-(-num_tokens // PAGE_SIZE) + 1) + 16
    runner = ModelRunner(loaded, num_pages, PAGE_SIZE)
    if fake == "forward":
        runner.forward = zero_cost_forward(runner)
    else:
        runner.model = ZeroCostModel(config.hidden_size, max(batch * PROMPT_LEN, 4096))
    ctl = EncodingControl()
    cfg = SchedulerConfig(overlap=overlap, num_pages=num_pages, max_running_requests=batch,
                          max_prefill_tokens=8192)
    s = UnifiedScheduler(cfg, "unified-0", runner, ctl)
    s.enable_prefix_cache()
    rng = random.Random(0)
    for i in range(batch):
        ctl.generate(f"r{i}", [rng.randrange(100, 40000) for _ in range(PROMPT_LEN)],
                     max_tokens=1 << 20, ignore_eos=True)
    return s, ctl


class Loop:
    """Drives the scheduler pass by pass (the event loop's body), overlap or normal."""

    def __init__(self, s: UnifiedScheduler, overlap: bool):
        self.s, self.overlap, self.last = s, overlap, None

    def step(self) -> None:
        if self.overlap:
            self.last = self.s.overlap_step(self.last)
        else:
            self.s.normal_step()

    def close(self) -> None:
        if self.last is not None:
            self.s._process(*self.last)
        self.s.executor.shutdown()


def measure(batch: int, steps: int, repeats: int, fake: str, overlap: bool,
            profile: int = 0) -> list[tuple[float, float]]:
    """(wall, CPU) µs per steady decode step, one pair per repeat. CPU time is the process's (every
    thread): on a shared machine it moves less than wall time with other processes' load."""
    warmup = 10
    s, ctl = build_worker(batch, PROMPT_LEN + 64 + warmup + steps * repeats, fake, overlap)
    loop = Loop(s, overlap)
    deadline = time.monotonic() + 300
    while len(s.decode) < batch or len(s.prefill):     # admit and prefill everything
        loop.step()
        assert time.monotonic() < deadline, "prefill did not finish"
    for _ in range(warmup):
        loop.step()
    out = []
    prof = cProfile.Profile() if profile else None
    for _ in range(repeats):
        if prof:
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            loop.step()
        out.append(((time.perf_counter() - t0) / steps * 1e6, (time.process_time() - c0) / steps * 1e6))
        if prof:
            prof.disable()
    assert len(s.decode) == batch and not ctl.errors(), "requests left the batch during the measurement"
    loop.close()
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile)
        print(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fake", choices=["forward", "model"], default="forward")
    ap.add_argument("--loop", choices=["overlap", "normal"], default="overlap")
    ap.add_argument("--profile", type=int, nargs="?", const=30, default=0,
                    help="print cProfile's top N functions for the largest batch")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the worker's default on 2 cores)")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    torch.set_num_threads(args.threads)
    for b in args.batches:
        prof = args.profile if b == max(args.batches) else 0
        t = measure(b, args.steps, args.repeats, args.fake, args.loop == "overlap", prof)
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        print(f"batch {b:4d}: {statistics.median(wall):8.1f} us/decode step wall (min {min(wall):.1f}, "
              f"max {max(wall):.1f}), {statistics.median(cpu):8.1f} us CPU; median of {len(t)}, "
              f"fake {args.fake}, {args.loop} loop", flush=True)


if __name__ == "__main__":
    main()
