"""Engine speed on a CUDA machine with dummy weights (default: Llama-3.2-1B shapes, bfloat16).

Measures prefill tokens/s on 2k-token prompts and decode tokens/s at several batch sizes,
and compares each decode step to its memory-bandwidth floor: (weight bytes + KV bytes read)
/ measured device copy bandwidth. Needs only torch, numpy, safetensors and this repo (no
gguf / tokenizers: dummy weights never load a tokenizer).

    python benchmarks/engine_gpu.py                                   # on the GPU machine
    python benchmarks/engine_gpu.py --device cpu --preset tiny-llama  # smoke run on CPU
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine.forward_batch import ForwardInput  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=1 << 20, ignore_eos=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, num_bytes: int = 1 << 28) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    return 2 * num_bytes * reps / (time.perf_counter() - t0)


def forward_input(ids, extend_lens, prefix_lens, tables, is_decode) -> ForwardInput:
    n = len(extend_lens)
    return ForwardInput(input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=extend_lens,
                        prefix_lens=prefix_lens, page_tables=tables, sample=[True] * n, sampling=[GREEDY] * n,
                        is_decode=is_decode)


def bench_prefill(runner, args, vocab) -> float:
    g = torch.Generator().manual_seed(0)
    per_forward = max(1, args.prefill_tokens // args.prompt_len)
    pages = -(-args.prompt_len // runner.page_size)
    tables = [runner.page_allocator.allocate(pages) for _ in range(per_forward)]
    ids = torch.randint(0, vocab, (per_forward * args.prompt_len,), generator=g).tolist()
    fi = forward_input(ids, [args.prompt_len] * per_forward, [0] * per_forward, tables, False)
    runner.forward(fi)   # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.reps):
        runner.forward(fi)
    sync(args.device)
    elapsed = (time.perf_counter() - t0) / args.reps
    for t in tables:
        runner.page_allocator.free(t)
    return per_forward * args.prompt_len / elapsed


def bench_decode(runner, args, batch: int, vocab: int, weight_bytes: int, bandwidth: float):
    cfg = runner.config
    ctx = args.decode_context
    steps = args.decode_steps
    pages = -(-(ctx + steps + 1) // runner.page_size)
    tables = [runner.page_allocator.allocate(pages) for _ in range(batch)]
    # the KV content does not matter for speed: fill the context by importing random KV
    kv = torch.randn(cfg.num_layers, 2, ctx, cfg.num_kv_heads, cfg.head_dim).to(runner.dtype)
    for t in tables:
        runner.import_kv(t, kv)
    tokens = [1] * batch
    fi = lambda pos: forward_input(tokens, [1] * batch, [pos] * batch, tables, True)  # noqa: E731
    runner.forward(fi(ctx))   # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for s in range(steps):
        runner.forward(fi(ctx + s))
    sync(args.device)
    step_s = (time.perf_counter() - t0) / steps
    kv_bytes = batch * (ctx + steps // 2) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * \
        runner.kv_pool.kv.element_size()
    floor_s = (weight_bytes + kv_bytes) / bandwidth
    for t in tables:
        runner.page_allocator.free(t)
    return batch / step_s, step_s, floor_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="tokens per prefill forward")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = [int(b) for b in args.batches.split(",")]
    if args.device == "cpu" and args.preset != "tiny-llama":
        print("note: a full-size preset on CPU is slow; try --preset tiny-llama")

    loaded = load_model(args.preset, path=args.preset, load_format="dummy", dtype=dtype, device=args.device)
    cfg = loaded.config
    max_batch = max(batches)
    tokens_needed = max(max_batch * (args.decode_context + args.decode_steps + 1 + args.page_size),
                        args.prefill_tokens + args.prompt_len)
    runner = ModelRunner(loaded, num_pages=tokens_needed // args.page_size + 16, page_size=args.page_size,
                         device=args.device, dtype=dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    bandwidth = copy_bandwidth(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.preset} (dummy, {dtype}) on {name}: {weight_bytes / 1e9:.2f} GB weights, "
          f"KV pool {runner.kv_pool.num_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"prefill ({args.prompt_len}-token prompts, {args.prefill_tokens} tokens/forward): "
          f"{bench_prefill(runner, args, cfg.vocab_size):,.0f} tokens/s")
    print(f"decode (context {args.decode_context}, {args.decode_steps} steps):")
    for b in batches:
        tps, step_s, floor_s = bench_decode(runner, args, b, cfg.vocab_size, weight_bytes, bandwidth)
        print(f"  batch {b:4d}: {tps:10,.0f} tokens/s  {1e3 * step_s:8.2f} ms/step  bandwidth floor "
              f"{1e3 * floor_s:7.2f} ms/step ({100 * floor_s / step_s:.0f}% of it)")


if __name__ == "__main__":
    main()
