"""Cost of grammar masks (structured outputs) on decode step time, CPU or CUDA.

One process, side by side per batch size B: the same B requests through `LLM.generate`
(greedy, EOS ignored, `--steps` tokens) unconstrained, then each constrained by a JSON
schema (xgrammar). Every forward is timed; the figures are medians over `--repeats`
interleaved runs, counting only steps where every grammar was still active (a finished JSON
admits only EOS, and a terminated matcher costs nothing): the whole decode step, and the
part after the model (logits, processors, mask, draw, accepting the token), which the mask
changes and the model part does not -- on a busy machine the whole step is noisy, this part
much less. A third figure isolates the mask itself: fill the bitmask for B matchers
mid-object and apply it to [B, vocab] logits.

    python benchmarks/grammar_mask.py                                   # CPU, default model
    python benchmarks/grammar_mask.py --batch-sizes 1,8 --steps 16
    python benchmarks/grammar_mask.py --device cuda --load-format dummy --model-path DIR --dtype bfloat16
    python benchmarks/grammar_mask.py --write-md                        # append to BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from statistics import median

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine.grammar import apply_grammar_masks  # noqa: E402
from cluster.engine.llm import LLM  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

SECTION = "## Structured outputs: grammar mask cost"
SCHEMA = {"type": "object", "required": ["items"], "additionalProperties": False,
          "properties": {"items": {"type": "array", "items": {
              "type": "object", "required": ["name", "score", "tags"], "additionalProperties": False,
              "properties": {"name": {"type": "string"}, "score": {"type": "number"},
                             "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}}}}}}}


def timed_decode_steps(llm: LLM, prompts, sp: SamplingParams) -> tuple[list[float], list[float]]:
    """(whole decode step seconds, the part after the model: logits, mask, sampling) per active step."""
    steps: list[float] = []
    samples: list[float] = []
    forward = llm.runner.forward

    def timed(fi):
        active = all(g is None or g.is_active for g in fi.grammars)
        if fi.is_decode and str(llm.runner.device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward(fi)          # returns CPU tensors: the device work is done
        if fi.is_decode and active:
            steps.append(time.perf_counter() - t0)
            samples.append(out.timings["total_s"] - out.timings["model_s"])
        return out
    llm.runner.forward = timed
    try:
        llm.generate(prompts, sp)
    finally:
        llm.runner.forward = forward
    return steps, samples


def mask_only(backend, tokenizer, device, b: int, reps: int) -> float:
    """Median seconds of one fill + apply for B matchers inside the JSON object (a median of
    single timings: a preempted one on a busy machine does not move it)."""
    prefix = tokenizer.encode('{"items": [{"name": "x", "score": 1.5, "tags": ["alpha"]}, {"name": "')
    grammars = [backend.matcher("json_schema", json.dumps(SCHEMA), accepted=prefix) for _ in range(b)]
    logits = torch.randn(b, backend.vocab_size, device=device)
    sync = torch.cuda.synchronize if logits.is_cuda else (lambda: None)
    times = []
    for _ in range(reps + 3):
        fresh = logits.clone()   # NOTE: fresh logits: masking already-masked ones skips the writes
        sync()
        t0 = time.perf_counter()
        apply_grammar_masks(fresh, grammars)
        sync()
        times.append(time.perf_counter() - t0)
    return median(times[3:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--model-path", default="")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-md", action="store_true")
    ap.add_argument("--json", default="", help="also write the rows to this file")
    ap.add_argument("--mask-only", action="store_true", help="only the mask (no model: seconds, not minutes)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.mask_only:
        from cluster.engine.grammar import GrammarBackend
        from cluster.engine.model_files import load_tokenizer
        tok = load_tokenizer(path=args.model_path, load_format=args.load_format)
        backend = GrammarBackend(tok, tok.vocab_size)
        for b in sizes:
            print(f"B={b:3d}  mask fill+apply {1e3 * mask_only(backend, tok, args.device, b, 200):.3f} ms "
                  "(median of 200)", flush=True)
        return
    llm = LLM(path=args.model_path, load_format=args.load_format, dtype=args.dtype, device=args.device,
              num_pages=max(sizes) * -(-(args.prompt_len + args.steps + 2) // 16) + 8, page_size=16,
              max_batch_size=max(sizes))
    g = torch.Generator().manual_seed(0)
    free = SamplingParams(max_tokens=args.steps, ignore_eos=True)
    constrained = SamplingParams(max_tokens=args.steps, ignore_eos=True, grammar_kind="json_schema",
                                 grammar_spec=json.dumps(SCHEMA))
    llm.generate([[100, 200, 300]] * 2, constrained)          # warm-up (compiles the grammar, loads xgrammar)
    rows = []
    for b in sizes:
        prompts = [torch.randint(17, 20000, (args.prompt_len,), generator=g).tolist() for _ in range(b)]
        base, masked, base_tail, masked_tail = [], [], [], []
        for _ in range(args.repeats):      # interleaved, so load on a shared machine hits both alike
            steps, tail = timed_decode_steps(llm, prompts, free)
            base, base_tail = base + steps, base_tail + tail
            steps, tail = timed_decode_steps(llm, prompts, constrained)
            masked, masked_tail = masked + steps, masked_tail + tail
        row = {"batch": b, "free_step_ms": 1e3 * median(base), "grammar_step_ms": 1e3 * median(masked),
               "free_tail_ms": 1e3 * median(base_tail), "grammar_tail_ms": 1e3 * median(masked_tail),
               "grammar_steps": len(masked),
               "mask_only_ms": 1e3 * mask_only(llm.grammar_backend, llm.tokenizer, llm.runner.device, b, 50)}
        row["overhead_pct"] = 100 * (row["grammar_step_ms"] / row["free_step_ms"] - 1)
        rows.append(row)
        print(f"B={b:3d}  decode step {row['free_step_ms']:7.2f} ms free, {row['grammar_step_ms']:7.2f} ms "
              f"with grammar ({row['overhead_pct']:+.1f}%, {len(masked)} active steps); after the model "
              f"{row['free_tail_ms']:.2f} -> {row['grammar_tail_ms']:.2f} ms; "
              f"mask fill+apply alone {row['mask_only_ms']:.3f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write_md:
        write_md(args, rows)


def write_md(args, rows) -> None:
    from benchmarks.common import machine, now_utc
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine()
    lines = [f"\n{SECTION} ({args.device})\n",
             f"{now_utc()}, {where}. `python benchmarks/grammar_mask.py --device {args.device} "
             f"--batch-sizes {args.batch_sizes} --steps {args.steps}`: median decode step (greedy, "
             f"{args.prompt_len}-token prompts) unconstrained vs every request under a nested JSON schema, "
             "and the mask alone (fill B bitmasks + apply to the logits).\n",
             "| batch | decode step, free (ms) | with grammar (ms) | step overhead | after the model, free -> grammar "
             "(ms) | mask fill+apply alone (ms) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['free_step_ms']:.2f} | {r['grammar_step_ms']:.2f} | "
              f"{r['overhead_pct']:+.1f}% | {r['free_tail_ms']:.2f} -> {r['grammar_tail_ms']:.2f} | "
              f"{r['mask_only_ms']:.3f} |" for r in rows]
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"), "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
