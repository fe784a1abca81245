"""Engine alone on the CPU, a decode batch: ms per step and tok/s of B requests decoding together.

What a busy worker's decode steps cost without the cluster around them (`cpu_cluster.py --streams 16`
measures the whole path): B requests at different context lengths (~`--context` tokens on average,
spread by +-25%) prefilled, then `--steps` decode steps of all of them at once, greedy, through
`ModelRunner.forward` with a persistent-batch block table as the scheduler builds it.

    python benchmarks/cpu_batch_decode.py                          # batch 16, native weights, 2 threads
    python benchmarks/cpu_batch_decode.py --batch 1,4,16 --weights native,float32
    python benchmarks/cpu_batch_decode.py --profile                # top ops of one step (torch profiler)
    python benchmarks/cpu_batch_decode.py --trees /path/to/before,.  # two checkouts in alternating processes
    python benchmarks/cpu_batch_decode.py --agreement 32           # native batch logits against float32's
    python benchmarks/cpu_batch_decode.py --kernel-ab              # steps alternating: LM head on the packed
                                                                   # kernel (as before) / on the bf16 GEMM
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cpu_decode import PROMPT, _input  # noqa: E402
from cluster.engine.forward_batch import ForwardInput  # noqa: E402
from cluster.engine.llm import LLM  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=1)


class Batch:
    """B requests prefilled one by one, each on its own pages; `step()` decodes all of them once."""

    def __init__(self, llm: LLM, batch: int, context: int, steps: int):
        runner = self.runner = llm.runner
        ids = llm.tokenizer.encode(PROMPT * (1 + 2 * context // 200))
        lens = [max(8, int(context * (0.75 + 0.5 * i / max(1, batch - 1)))) for i in range(batch)]
        self.pages = [runner.page_allocator.allocate(-(-(n + steps + 8) // runner.page_size)) for n in lens]
        width = max(len(p) for p in self.pages)
        self.table = np.zeros((batch, width), dtype=np.int64)
        for i, p in enumerate(self.pages):
            self.table[i, :len(p)] = p
        self.tokens = [int(runner.forward(_input(ids[i:i + n], 0, p, False)).next_token_ids[0])
                       for i, (n, p) in enumerate(zip(lens, self.pages))]
        self.positions = list(lens)

    def step(self, tokens: Optional[list[int]] = None, logits: bool = False):
        """One decode step of every request (fed `tokens` instead of their own picks when given);
        -> seconds, or with `logits` the step's float32 logits `[B, vocab]`."""
        b = len(self.tokens)
        fi = ForwardInput(input_ids=torch.tensor(tokens or self.tokens, dtype=torch.int64), extend_lens=[1] * b,
                          prefix_lens=list(self.positions), page_tables=[[]] * b, sample=[True] * b,
                          sampling=[GREEDY] * b, is_decode=True, block_table=torch.from_numpy(self.table),
                          all_greedy=True, return_logits=logits)
        t0 = time.perf_counter()
        out = self.runner.forward(fi)
        dt = time.perf_counter() - t0
        self.tokens = out.next_token_ids.tolist()
        self.positions = [p + 1 for p in self.positions]
        return out.logits if logits else dt

    def free(self) -> None:
        for p in self.pages:
            self.runner.page_allocator.free(p)


def measure(llm: LLM, batch: int, args) -> tuple[float, float]:
    """-> (median ms per step, CPU ms of this thread per step) over `args.steps` steps after 3 warm-up ones."""
    b = Batch(llm, batch, args.context, args.steps + 3)
    try:
        walls, cpus = [], []
        for i in range(args.steps + 3):
            c = time.thread_time()
            w = b.step()
            if i >= 3:
                walls.append(w)
                cpus.append(time.thread_time() - c)
        return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3
    finally:
        b.free()


def profile(llm: LLM, batch: int, args) -> None:
    b = Batch(llm, batch, args.context, 8)
    try:
        for _ in range(3):
            b.step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                b.step()
    finally:
        b.free()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


def agreement(llms: dict[str, LLM], batch: int, args) -> str:
    """Native against float32 weights over `args.agreement` decode steps of a batch, both fed float32's
    greedy tokens: the largest logit difference per (step, request), and how often the argmax agrees."""
    ref, native = (Batch(llms[w], batch, args.context, args.agreement) for w in ("float32", "native"))
    try:
        diffs, same = [], []
        fed = ref.tokens
        for _ in range(args.agreement):
            a, b = ref.step(fed, logits=True), native.step(fed, logits=True)
            fed = ref.tokens
            diffs.append((b - a).abs().amax(dim=-1))
            same.append(b.argmax(-1) == a.argmax(-1))
    finally:
        ref.free()
        native.free()
    diff, agree = torch.cat(diffs), torch.cat(same).float().mean()
    return (f"batch {batch}, {args.agreement} steps: native vs float32 decode logits, max abs difference per "
            f"request and step median {diff.median():.3f}, max {diff.max():.3f}; argmax agrees on "
            f"{agree * 100:.1f}% (prompts prefilled by each, so the KV differs too)")


def kernel_ab(llm: LLM, batch: int, args) -> str:
    """Decode steps of one batch alternating between the LM head's two packed int4 passes at every row
    count (the tree before) and its bfloat16 GEMM above SPLIT_PACKED_MAX_ROWS rows: pairs of steps under
    the same load; -> the medians and the median per-pair ratio."""
    from cluster.engine import quant_linear
    split_rows = quant_linear.SPLIT_PACKED_MAX_ROWS
    b = Batch(llm, batch, args.context, 2 * args.steps + 4)
    kernel, dense = [], []
    try:
        for i in range(args.steps + 2):
            for rows, out in ((1 << 30, kernel), (split_rows, dense)):
                quant_linear.SPLIT_PACKED_MAX_ROWS = rows
                out.append(b.step())
    finally:
        quant_linear.SPLIT_PACKED_MAX_ROWS = split_rows
        b.free()
    kernel, dense = kernel[2:], dense[2:]
    ratio = statistics.median(d / k for k, d in zip(kernel, dense))
    return (f"batch {batch}: packed kernel {statistics.median(kernel) * 1e3:.1f} ms/step, bf16 GEMM "
            f"{statistics.median(dense) * 1e3:.1f} ms/step, median ratio of pairs {ratio:.2f}x")


TREE_PROBE = """
import sys, torch
from benchmarks.cpu_batch_decode import measure, parse
from cluster.engine.llm import LLM
args = parse(sys.argv[1:])
llm = LLM(num_pages=1024, page_size=16, cpu_weights=args.weights[0])
torch.set_num_threads(args.threads)
with torch.inference_mode():
    for batch in args.batch:
        print(batch, *measure(llm, batch, args), flush=True)
"""


def compare_trees(trees: list[str], argv: list[str], args) -> None:
    """Each checkout's engine in its own process, alternating, per round; ms per step and ratio to the first."""
    for r in range(args.rounds):
        rows = []
        for tree in trees:
            tree = os.path.abspath(tree)
            out = subprocess.run([sys.executable, "-c", TREE_PROBE, *argv], check=True, cwd=tree, text=True,
                                 env={**os.environ, "PYTHONPATH": tree}, capture_output=True, timeout=1200)
            lines = [ln.split() for ln in out.stdout.strip().splitlines()]
            rows.append((tree, {int(b): (float(w), float(c)) for b, w, c in lines[-len(args.batch):]},
                         os.getloadavg()[0]))
        for batch in args.batch:
            base = rows[0][1][batch][0]
            print(f"round {r}, batch {batch}: " + "; ".join(
                f"{t}: {m[batch][0]:.1f} ms/step ({m[batch][0] / base:.2f}x), {batch * 1e3 / m[batch][0]:.0f} tok/s, "
                f"CPU {m[batch][1]:.1f} ms, load {load:.1f}" for t, m, load in rows), flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=[16])
    ap.add_argument("--context", type=int, default=250, help="mean context length (tokens)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--weights", type=lambda s: s.split(","), default=["native"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--trees", default="", help="','-separated checkouts: compare their engines instead")
    ap.add_argument("--agreement", type=int, default=0, help="decode steps: native batch logits against float32's")
    ap.add_argument("--kernel-ab", action="store_true", help="alternate steps: packed kernel / bf16 GEMM")
    return ap.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    if args.trees:
        i = argv.index("--trees")
        compare_trees(args.trees.split(","), argv[:i] + argv[i + 2:], args)
        return
    if args.agreement:
        args.weights = ["native", "float32"]
    llms = {w: LLM(num_pages=1024, page_size=16, cpu_weights=w) for w in args.weights}
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        if args.agreement:
            for batch in args.batch:
                print(agreement(llms, batch, args))
            return
        if args.kernel_ab:
            for r in range(args.rounds):
                for batch in args.batch:
                    print(f"round {r}: {kernel_ab(llms[args.weights[0]], batch, args)} "
                          f"(load {os.getloadavg()[0]:.1f})", flush=True)
            return
        if args.profile:
            for w, llm in llms.items():
                print(f"{w} weights, batch {args.batch[0]}:")
                profile(llm, args.batch[0], args)
            return
        for r in range(args.rounds):
            for batch in args.batch:
                for w, llm in llms.items():
                    ms, cpu = measure(llm, batch, args)
                    print(f"round {r}: {w}, batch {batch}: {ms:.1f} ms/step, {batch * 1e3 / ms:.0f} tok/s, "
                          f"CPU of this thread {cpu:.1f} ms/step (load {os.getloadavg()[0]:.1f})", flush=True)


if __name__ == "__main__":
    main()
