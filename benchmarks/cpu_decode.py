"""Engine alone on the CPU, one stream, default model: native (packed GGUF) vs float32 weights.

Both weight forms are loaded in one process and measured in alternating rounds (the machine
is shared and noisy: compare the ratio, not the absolute figures across runs). Per torch
thread count: ms per decode token (median of the per-token forward times of each round, best
round reported) and prefill tok/s for a ~200-word prompt (best round).

    python benchmarks/cpu_decode.py                      # 64 tokens, 3 rounds, threads 1 and 2
    python benchmarks/cpu_decode.py --tokens 32 --rounds 2 --threads 2
    python benchmarks/cpu_decode.py --write-md           # update BENCHMARKS.md ("CPU weights")
    python benchmarks/cpu_decode.py --trees /path/to/before,.  # two checkouts, native, alternating processes
    python benchmarks/cpu_decode.py --agreement 48       # native decode logits against float32's
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine.forward_batch import ForwardInput  # noqa: E402
from cluster.engine.llm import LLM  # noqa: E402
from cluster.engine.quant_linear import describe_cpu  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

SECTION = "## CPU weights"
BEGIN, END = "<!-- cpu_decode.py: generated table -->", "<!-- /cpu_decode.py -->"
MODES = ("native", "float32")
PROMPT = ("Write a detailed report on the history of the printing press. " * 20).strip()   # ~200 words
GREEDY = SamplingParams(max_tokens=1)


def _input(ids: list[int], prefix_len: int, pages: list[int], is_decode: bool) -> ForwardInput:
    return ForwardInput(input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=[len(ids)],
                        prefix_lens=[prefix_len], page_tables=[pages], sample=[True], sampling=[GREEDY],
                        is_decode=is_decode)


def one_stream(llm: LLM, prompt_ids: list[int], num_tokens: int) -> tuple[float, float]:
    """-> (prefill seconds, median seconds per decode token) for one greedy stream."""
    runner = llm.runner
    pages = runner.page_allocator.allocate(-(-(len(prompt_ids) + num_tokens) // runner.page_size))
    try:
        t0 = time.perf_counter()
        token = int(runner.forward(_input(prompt_ids, 0, pages, False)).next_token_ids[0])
        prefill_s = time.perf_counter() - t0
        steps = []
        for i in range(num_tokens):
            t0 = time.perf_counter()
            token = int(runner.forward(_input([token], len(prompt_ids) + i, pages, True)).next_token_ids[0])
            steps.append(time.perf_counter() - t0)
    finally:
        runner.page_allocator.free(pages)
    return prefill_s, statistics.median(steps)


def measure(llms: dict[str, LLM], threads: int, args) -> dict[str, tuple[float, float]]:
    """mode -> (best ms per token, best prefill tok/s) over alternating rounds."""
    torch.set_num_threads(threads)
    prompt_ids = llms["float32"].tokenizer.encode(PROMPT)
    best: dict[str, tuple[float, float]] = {}
    for llm in llms.values():
        one_stream(llm, prompt_ids[:32], 4)   # warm-up
    for _ in range(args.rounds):
        for mode, llm in llms.items():
            prefill_s, step_s = one_stream(llm, prompt_ids, args.tokens)
            ms, tps = step_s * 1e3, len(prompt_ids) / prefill_s
            old = best.get(mode, (float("inf"), 0.0))
            best[mode] = (min(old[0], ms), max(old[1], tps))
    return best


def stream_logits(llm: LLM, prompt_ids: list[int], tokens: Optional[list[int]], num_tokens: int):
    """Decode logits `[num_tokens, vocab]` of one stream, fed `tokens` (or its own greedy picks); -> (logits, tokens)."""
    runner = llm.runner
    pages = runner.page_allocator.allocate(-(-(len(prompt_ids) + num_tokens) // runner.page_size))
    try:
        token = int(runner.forward(_input(prompt_ids, 0, pages, False)).next_token_ids[0])
        fed, rows = [], []
        for i in range(num_tokens):
            token = tokens[i] if tokens is not None else token
            fi = _input([token], len(prompt_ids) + i, pages, True)
            fi.return_logits = True
            out = runner.forward(fi)
            fed.append(token)
            rows.append(out.logits[0])
            token = int(out.next_token_ids[0])
    finally:
        runner.page_allocator.free(pages)
    return torch.stack(rows), fed


def agreement(llms: dict[str, LLM], num_tokens: int) -> str:
    """Native against float32 weights along float32's greedy stream (both fed its tokens): per decode step,
    the largest logit difference, and whether the argmax agrees."""
    prompt_ids = llms["float32"].tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ref, tokens = stream_logits(llms["float32"], prompt_ids, None, num_tokens)
        native, _ = stream_logits(llms["native"], prompt_ids, tokens, num_tokens)
    diff = (native - ref).abs().amax(dim=-1)
    same = (native.argmax(-1) == ref.argmax(-1)).float().mean()
    return (f"native vs float32 decode logits, {num_tokens} steps of float32's greedy stream ({len(prompt_ids)}-token "
            f"prompt): max abs difference per step median {diff.median():.3f}, max {diff.max():.3f} (float32 logits "
            f"span {ref.min():.1f} to {ref.max():.1f}); argmax agrees on {same * 100:.1f}% of steps")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")


# one process per measurement: the tree's own engine (its PYTHONPATH), native weights, this thread.
# Prints the median wall and the median CPU time of this thread per decode step (on a shared machine
# the CPU time, 1 thread, moves far less than the wall time with other processes' load), and the
# top-level aten ops of one decode step (torch profiler; ops called by other ops not counted).
TREE_PROBE = """
import statistics, sys, time, torch
from benchmarks.cpu_decode import PROMPT, _input
from cluster.engine.llm import LLM
threads, tokens = int(sys.argv[1]), int(sys.argv[2])
llm = LLM(num_pages=64, page_size=16, **({"kv_dtype": sys.argv[3]} if sys.argv[3:] else {}))
torch.set_num_threads(threads)
ids, runner = llm.tokenizer.encode(PROMPT), llm.runner
pages = runner.page_allocator.allocate(-(-(len(ids) + tokens + 5) // runner.page_size))
walls, cpus = [], []
with torch.inference_mode():
    token = int(runner.forward(_input(ids, 0, pages, False)).next_token_ids[0])
    for i in range(tokens + 4):
        t, c = time.perf_counter(), time.thread_time()
        token = int(runner.forward(_input([token], len(ids) + i, pages, True)).next_token_ids[0])
        if i >= 4:   # warm-up steps
            walls.append(time.perf_counter() - t)
            cpus.append(time.thread_time() - c)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:   # ops of one step
        runner.forward(_input([token], len(ids) + tokens + 4, pages, True))
ops = [e for e in prof.events() if e.name.startswith("aten::")]
top = sum(1 for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
print(statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3, top)
"""


def compare_trees(trees: list[str], args) -> None:
    """ms per decode token of each checkout's engine (wall and this thread's CPU time), in alternating
    processes (native weights); the ratios to the first tree per round, and the load average with each."""
    kv_dtypes = args.kv_dtypes.split(",") if args.kv_dtypes else [""] * len(trees)
    if len(kv_dtypes) != len(trees):
        raise SystemExit("--kv-dtypes: one per tree")
    for r in range(args.rounds):
        for threads in args.threads:
            row = []
            for tree, kv_dtype in zip(trees, kv_dtypes):
                tree = os.path.abspath(tree)
                extra = [kv_dtype] if kv_dtype else []
                out = subprocess.run([sys.executable, "-c", TREE_PROBE, str(threads), str(args.tokens), *extra], check=True,
                                     env={**os.environ, "PYTHONPATH": tree}, cwd=tree, capture_output=True,
                                     text=True, timeout=900)
                wall, cpu, ops = map(float, out.stdout.split()[-3:])
                row.append((tree + (f" kv {kv_dtype}" if kv_dtype else ""), wall, cpu, int(ops), os.getloadavg()[0]))
            print(f"round {r}, {threads} threads: " + "; ".join(
                f"{t}: {wall:.2f} ms wall ({wall / row[0][1]:.2f}x), {cpu:.2f} ms CPU of the forward's thread "
                f"({cpu / row[0][2]:.2f}x), {ops} ops per step, load {load:.1f}" for t, wall, cpu, ops, load in row),
                flush=True)


def report(results: dict[int, dict[str, tuple[float, float]]], num_prompt: int, args) -> str:
    lines = [f"{datetime.date.today()}, {cpu_model()} ({os.cpu_count()} cores, {describe_cpu()}), "
             f"torch {torch.__version__}; `python benchmarks/cpu_decode.py --tokens {args.tokens} "
             f"--rounds {args.rounds} --threads {','.join(map(str, args.threads))}`. "
             f"Engine alone (ModelRunner forwards), one stream, default model; best of "
             f"{args.rounds} alternating rounds. Other sessions were loading the machine.", "",
             f"| torch threads | native ms/token | float32 ms/token | ratio | native prefill tok/s "
             f"| float32 prefill tok/s ({num_prompt}-token prompt) |", "|---|---|---|---|---|---|"]
    for threads, r in results.items():
        (nm, np_), (fm, fp) = r["native"], r["float32"]
        lines.append(f"| {threads} | {nm:.1f} | {fm:.1f} | {fm / nm:.2f}x | {np_:.0f} | {fp:.0f} |")
    return "\n".join(lines)


def write_md(table: str) -> None:
    """Replace the generated table of BENCHMARKS.md's "CPU weights" section (between its markers),
    keeping the prose around it; append the section if it is missing."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
    text = open(path).read()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    with open(path, "w") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--write-md", action="store_true")
    ap.add_argument("--trees", default="", help="','-separated checkouts: compare their engines instead")
    ap.add_argument("--kv-dtypes", default="", help="with --trees: each tree's [model] kv_dtype (',' list)")
    ap.add_argument("--agreement", type=int, default=0, help="decode steps: native logits against float32's")
    args = ap.parse_args()
    if args.trees:
        compare_trees(args.trees.split(","), args)
        return
    if args.agreement:   # --kv-dtypes D: the native engine's KV cache in D (float32's stays the reference)
        llms = {mode: LLM(num_pages=64, page_size=16, cpu_weights=mode,
                          kv_dtype=args.kv_dtypes or "auto" if mode == "native" else "auto") for mode in MODES}
        print(agreement(llms, args.agreement))
        return
    llms = {mode: LLM(num_pages=64, page_size=16, cpu_weights=mode) for mode in MODES}
    num_prompt = len(llms["float32"].tokenizer.encode(PROMPT))
    with torch.inference_mode():
        results = {t: measure(llms, t, args) for t in args.threads}
    table = report(results, num_prompt, args)
    print(table)
    if args.write_md:
        write_md(table)


if __name__ == "__main__":
    main()
