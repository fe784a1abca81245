"""DLLM block decode against autoregressive decode of the same shape on one GPU, dummy weights.

Per preset (default: SDAR-1.7B and SDAR-8B shapes, Qwen3 layout, bfloat16) and batch, B requests of
`--prompt-len` random tokens each generate `--max-tokens` tokens (EOS ignored), in-process, no cluster:
- autoregressive: the unified worker's scheduler over the runner (prefill, then batched decode
  replayed from the decode CUDA graphs, future tokens, overlap loop);
- DLLM: the DLLM worker's scheduler over the same runner, greedy, blocks of `--block-size` filled in
  `--steps` fixed steps, each round's blocks denoised to the end on the device (dllm/block_loop.py;
  CUDA graphs per batch bucket captured at its start, not timed).
tok/s = output tokens over the wall time from the first step to the last token; ratio = DLLM / AR.
The goal (batch 1, block 4, 2 steps): ratio >= 1.8. DLLM runs in two modes on the same scheduler:
- chained (the default path, `dllm_tok_s` / `ratio`): round N+1 is launched from round N's tokens
  still on the device, its read deferred, so the host's work on N overlaps N+1 on the device;
- sequential (`seq_*`, the path before chaining): a round is launched once the one before it was
  processed, so at batch 1 the host's work between rounds is never overlapped.
`chain_gain` = chained / sequential tok/s. `*_device_share`: the rounds' spans on the device (CUDA
events around each round) over the wall time; 1 - share is the device idle between rounds.
`seq_loop_share`: the sequential wall time spent inside the block loop (inputs copied, steps
replayed, tokens read). Each figure is the best of `--repeat` runs, the modes and AR alternating.

    python benchmarks/dllm_gpu.py --json out.json                                   # on the GPU machine
    python benchmarks/dllm_gpu.py --device cpu --presets tiny --batch 1,4 --max-tokens 16 --prompt-len 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.engine_gpu import sync  # noqa: E402
from cluster.config import SchedulerConfig  # noqa: E402
from cluster.dllm_params import DllmParams  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.unified import UnifiedScheduler  # noqa: E402
from dllm.model_spec import detect_spec  # noqa: E402
from dllm.scheduler import DllmScheduler  # noqa: E402
from tests.queue_control import QueueControl  # noqa: E402

QWEN3 = {"rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768, "head_dim": 128,
         "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645}
PRESETS = {   # config.json of each shape: SDAR checkpoints are Qwen3's layout (sdar_layout.py)
    "1b": {**QWEN3, "architectures": ["SDARForCausalLM"], "hidden_size": 2048, "intermediate_size": 6144,
           "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
           "tie_word_embeddings": True, "mask_token_id": 151669},
    "8b": {**QWEN3, "architectures": ["SDARForCausalLM"], "hidden_size": 4096, "intermediate_size": 12288,
           "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
           "tie_word_embeddings": False, "mask_token_id": 151669},
    "llada-8b": {"architectures": ["LLaDAModelLM"], "d_model": 4096, "n_heads": 32, "n_kv_heads": 32,
                 "n_layers": 32, "mlp_hidden_size": 12288, "vocab_size": 126464, "embedding_size": 126464,
                 "rope_theta": 500000.0, "max_sequence_length": 4096, "mask_token_id": 126336,
                 "eos_token_id": 126081, "rms_norm_eps": 1e-5},
    "tiny": {**QWEN3, "architectures": ["SDARForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "vocab_size": 512, "tie_word_embeddings": True, "mask_token_id": 500, "eos_token_id": 2},
}


class IdsOnlyTokenizer:
    """Dummy weights carry no tokenizer and the GPU machine has no default model: ids only."""
    eos_token_ids = frozenset()

    def decode(self, ids, skip_special_tokens=True):
        return ""


def model_dir(preset: str) -> str:
    out = tempfile.mkdtemp(prefix=f"dllm-{preset}-")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(PRESETS[preset], f)
    return out


def run(sched, control: QueueControl, prompts: list[list[int]], max_tokens: int, device: str) -> float:
    """Seconds from the first step to the last token of `prompts` on `sched` (driven on this thread)."""
    for i, p in enumerate(prompts):
        control.generate(f"q{len(control.sent)}-{i}", p, max_tokens=max_tokens, ignore_eos=True)
    sync(device)
    t0 = time.perf_counter()
    last = None
    sched.recv_requests()
    while sched.reqs or last is not None:
        last = sched.overlap_step(last) if sched.config.overlap else sched.normal_step()
        if control.errors():
            raise RuntimeError(control.errors()[0].reason)
    return time.perf_counter() - t0


def loop_counts(sched) -> tuple:
    loop = getattr(sched, "block_loop", None)
    return (loop.num_graph_steps, loop.num_eager_steps, loop.num_host_reads, loop.run_s) if loop else (0, 0, 0, 0.0)


def bench(sched, prompts, args, chain: bool = False) -> dict:
    control = sched.control
    loop = getattr(sched, "block_loop", None)
    if loop is not None:
        sched.chain_rounds = chain
    run(sched, control, prompts[:1], 8, args.device)                  # warm-up: eager paths, Triton compiles
    sent, forwards, before = len(control.sent), sched.forward_ct, loop_counts(sched)
    chained_before = getattr(sched, "num_chained_rounds", 0)
    if loop is not None:
        loop.device_spans = []
    wall = run(sched, control, prompts, args.max_tokens, args.device)
    device_s = loop.device_s() if loop is not None else 0.0
    tokens = sum(len(item.token_ids) for m in control.sent[sent:] if hasattr(m, "all_items") for item in m.all_items())
    assert tokens == len(prompts) * args.max_tokens, (tokens, len(prompts), args.max_tokens)
    graph_steps, eager_steps, reads, loop_s = (y - x for x, y in zip(before, loop_counts(sched)))
    return {"tok_s": tokens / wall, "wall_s": wall, "rounds": sched.forward_ct - forwards,
            "chained_rounds": getattr(sched, "num_chained_rounds", 0) - chained_before,
            "graph_steps": graph_steps, "eager_steps": eager_steps, "host_reads": reads, "loop_s": loop_s,
            "device_share": device_s / wall}


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["tok_s"])


@torch.inference_mode()
def run_preset(preset: str, args, rows: list) -> None:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = [int(b) for b in args.batch.split(",")]
    path = model_dir(preset)
    loaded = load_model(preset, path=path, load_format="dummy", dtype=dtype, device=args.device)
    loaded._tokenizer = IdsOnlyTokenizer()
    cfg = loaded.config
    per_req = args.prompt_len + args.max_tokens + 2 * args.block_size
    num_pages = max(batches) * -(-per_req // args.page_size) + 64
    runner = ModelRunner(loaded, num_pages, args.page_size, args.device, dtype, max_decode_batch=max(batches))
    spec = detect_spec(path)
    params = DllmParams(block_size=args.block_size, algorithm="fixed_steps", steps_per_block=args.steps)
    config = SchedulerConfig(overlap=True, max_running_requests=max(batches),
                             max_prefill_tokens=max(batches) * (args.prompt_len + args.block_size))
    t0 = time.perf_counter()
    dllm = DllmScheduler(config, "dllm-0", runner, QueueControl(), spec, params, block_loop=True)
    capture_s = time.perf_counter() - t0
    ar = UnifiedScheduler(config, "unified-0", runner, QueueControl())
    g = torch.Generator().manual_seed(0)
    weights_gb = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e9
    print(json.dumps({"preset": preset, "spec": spec.kind, "dtype": dtype, "weights_gb": weights_gb,
                      "layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                      "block_graphs": dllm.block_loop.graphs is not None if dllm.block_loop else False,
                      "block_graph_capture_s": capture_s}), flush=True)
    for batch in batches:
        prompts = torch.randint(3, min(cfg.vocab_size, spec.mask_token_id), (batch, args.prompt_len),
                                generator=g).tolist()
        runs: dict[str, list] = {"ar": [], "seq": [], "chain": []}
        for _ in range(args.repeat):      # alternating, so a drift of the machine hits each alike
            runs["ar"].append(bench(ar, prompts, args))
            runs["seq"].append(bench(dllm, prompts, args, chain=False))
            runs["chain"].append(bench(dllm, prompts, args, chain=True))
        a, q, d = best(runs["ar"]), best(runs["seq"]), best(runs["chain"])
        row = {"preset": preset, "batch": batch, "block_size": args.block_size, "steps": args.steps,
               "ar_tok_s": a["tok_s"], "dllm_tok_s": d["tok_s"], "ratio": d["tok_s"] / a["tok_s"],
               "seq_dllm_tok_s": q["tok_s"], "seq_ratio": q["tok_s"] / a["tok_s"],
               "chain_gain": d["tok_s"] / q["tok_s"],
               "ar_wall_s": a["wall_s"], "dllm_wall_s": d["wall_s"], "seq_dllm_wall_s": q["wall_s"],
               "ar_forwards": a["rounds"], "dllm_rounds": d["rounds"], "dllm_chained_rounds": d["chained_rounds"],
               "dllm_graph_steps": d["graph_steps"], "dllm_eager_steps": d["eager_steps"],
               "dllm_host_reads": d["host_reads"],
               "dllm_device_share": d["device_share"], "seq_device_share": q["device_share"],
               # the block loop alone (inputs to tokens read): what the scheduler's own time leaves
               "seq_loop_share": q["loop_s"] / q["wall_s"],
               "seq_loop_tok_s": batch * args.max_tokens / q["loop_s"] if q["loop_s"] else None,
               "all_tok_s": {k: [round(r["tok_s"], 1) for r in v] for k, v in runs.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    dllm.executor.shutdown()
    ar.executor.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="1b,8b", help=f"of {', '.join(PRESETS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="fixed steps per block")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode (best kept)")
    ap.add_argument("--json", default="", help="write the rows to this file")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows: list = []
    for preset in args.presets.split(","):
        run_preset(preset, args, rows)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\n| model · batch | AR tok/s | DLLM tok/s sequential | chained (block %d, %d steps) | DLLM / AR "
          "sequential | chained | chained / sequential | device share seq / chained |" % (args.block_size, args.steps))
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} · {r['batch']} | {r['ar_tok_s']:,.1f} | {r['seq_dllm_tok_s']:,.1f} | "
              f"{r['dllm_tok_s']:,.1f} | {r['seq_ratio']:.2f}x | {r['ratio']:.2f}x | {r['chain_gain']:.2f}x | "
              f"{r['seq_device_share']:.2f} / {r['dllm_device_share']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
