"""Block diffusion on a causal model: tokens per forward and tokens/s by block size and rule.

    python benchmarks/dllm_blocks.py [--max-tokens 32] [--threads 2] [--no-overlap]

Runs a DllmScheduler in-process (the worker's real loop, fed through a queue pair) on the
default model (smollm2-135m-instruct, CPU, float32) for block sizes 1, 4, 8 with both rules:
low_confidence (threshold 0.9) and fixed_steps (steps_per_block = block_size / 2, i.e. two
tokens per forward by construction). Columns:

- tok/fwd:   tokens committed per request-forward (the `dllm_tokens_per_forward` gauge)
- fwd/blk:   request-forwards per completed block (`dllm_forwards_per_block`)
- rounds:    scheduler iterations (batched forwards) for the whole run
- tok/s:     output tokens over wall time, all requests together
- the last row: the engine's autoregressive `LLM.generate` on the same prompts (prefill +
  batched decode), for scale
- =AR:       share of output tokens equal to autoregressive greedy at the same index
             (block size 1 must give 100%; SmolLM2 was never trained to fill masks, so
             larger blocks trade agreement for fewer forwards)
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.config import SchedulerConfig  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402
from dllm.model_spec import DllmModelSpec  # noqa: E402
from cluster.dllm_params import DllmParams  # noqa: E402
from dllm.scheduler import DllmScheduler  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a hash table is.", "List three prime numbers."]


def run(runner, prompts, params: DllmParams, max_tokens: int, overlap: bool) -> dict:
    control = QueueControl()
    sched = DllmScheduler(SchedulerConfig(overlap=overlap), "dllm-bench", runner, control,
                          DllmModelSpec.causal(min(runner.tokenizer.eos_token_ids)), params)
    for i, ids in enumerate(prompts):
        control.generate(f"q{i}", ids, max_tokens=max_tokens, ignore_eos=True)
    loop = threading.Thread(target=sched.event_loop, daemon=True)
    t0 = time.perf_counter()
    loop.start()
    while control.num_finished < len(prompts) and not control.num_errors:
        time.sleep(0.001)
    wall = time.perf_counter() - t0
    sched.stop()
    loop.join()
    if control.num_errors:
        raise RuntimeError(control.errors()[0].reason)
    tokens = control.outputs()
    return {"tokens": [tokens[f"q{i}"] for i in range(len(prompts))], "wall": wall,
            "rounds": sched.forward_ct, "tok_fwd": sched.heartbeat_gauges().dllm_tokens_per_forward,
            "fwd_blk": sched.heartbeat_gauges().dllm_forwards_per_block}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-overlap", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model()
    runner = ModelRunner(loaded, num_pages=512, page_size=16)
    tok = loaded.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    overlap = not args.no_overlap
    run(runner, prompts[:1], DllmParams(block_size=4), 4, overlap)   # warm-up
    ar = run(runner, prompts, DllmParams(block_size=1), args.max_tokens, overlap)["tokens"]
    print(f"smollm2-135m-instruct, CPU float32, {torch.get_num_threads()} threads, {len(prompts)} requests x "
          f"{args.max_tokens} tokens, overlap={'on' if overlap else 'off'}")
    print(f"{'block':>5} {'algorithm':<15} {'knob':<9} {'tok/fwd':>7} {'fwd/blk':>7} {'rounds':>6} "
          f"{'tok/s':>7} {'=AR':>5}")
    for block_size in (1, 4, 8):
        for params, knob in ((DllmParams(block_size=block_size, threshold=0.9), "thr 0.9"),
                             (DllmParams(block_size=block_size, algorithm="fixed_steps",
                                         steps_per_block=max(1, block_size // 2)), f"steps {max(1, block_size // 2)}")):
            r = run(runner, prompts, params, args.max_tokens, overlap)
            total = sum(len(t) for t in r["tokens"])
            same = sum(a == b for out, ref in zip(r["tokens"], ar) for a, b in zip(out, ref))
            print(f"{block_size:>5} {params.algorithm:<15} {knob:<9} {r['tok_fwd']:>7.2f} {r['fwd_blk']:>7.2f} "
                  f"{r['rounds']:>6} {total / r['wall']:>7.1f} {100 * same / total:>4.0f}%")
    from cluster.engine.llm import LLM
    llm = LLM(num_pages=512, page_size=16)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True))
    wall = time.perf_counter() - t0
    same = sum(a == b for o, ref in zip(outs, ar) for a, b in zip(o.token_ids, ref))
    total = sum(len(o.token_ids) for o in outs)
    print(f"{'-':>5} {'AR LLM.generate':<15} {'':<9} {1.0:>7.2f} {'-':>7} {args.max_tokens:>6} "
          f"{total / wall:>7.1f} {100 * same / total:>4.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
