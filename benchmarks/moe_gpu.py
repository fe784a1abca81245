"""Sparse-MoE and MLA models on one GPU with dummy weights: engine speed, the fused MoE layer against a
bare torch loop, MLA decode attention against its latent bytes, and KV bytes per token for the handoff.

Per preset (default: Qwen3-30B-A3B and DeepSeek-V2-Lite shapes, bfloat16):
- prefill tokens/s (`ModelRunner.forward` over `--prefill-tokens` new tokens in `--prompt-len` prompts);
- decode ms/step of the engine at each batch (`--batches`) and `--context` tokens of context;
- the first sparse layer's experts at batch `--moe-batch`: the fused Triton kernel (triton_moe.py) and
  the plain loop over the active experts (`Experts.loop`, one GEMM pair per expert with tokens),
  router included in neither; the goal is fused >= 3x faster;
- MLA only: one layer's absorbed decode attention over `--mla-batch` requests of `--mla-context` tokens:
  the whole step with the Triton kernels replayed from a CUDA graph as the engine runs it (`mla_decode_ms`,
  `mla_ratio`; eagerly: `mla_decode_eager_ms`, Python's launches included), the two latent kernels alone
  (`mla_kernel_ms`, `mla_kernel_ratio`) and the gathered torch path (`mla_gathered_ms`, eager), against
  reading their latent KV once at the copy bandwidth measured here (goal: ratio <= 1.3); the kernels
  run as triton_mla_config's table configures them (`mla_config`, `mla_splits`). Then one layer's extend over a cached
  prefix of `--mla-context` tokens: the Triton prefill kernel against the gathered torch path
  (`mla_extend_triton_ms`, `mla_extend_torch_ms`), and the same prompts fresh (from position 0):
  the prefill kernel over their new tokens against SDPA's causal kernel (`mla_prefill_kernel_ms`,
  `mla_prefill_sdpa_ms`, `mla_prefill_speedup`);
- KV bytes per token moved by the handoff, against the dense Llama-3.1-8B's;
- `mla-sweep` (mla_decode_sweep.py, no model loaded): every candidate configuration of the MLA decode
  kernels at `--mla-batch` x `--mla-context` for `--mla-heads`, checked, timed and the best printed as a
  table row with its ratio; the whole absorbed step with the table's configuration and the best.
`--parts` picks among engine (prefill, decode steps, KV bytes), moe, mla-decode, mla-extend, mla-sweep:

    python benchmarks/moe_gpu.py --presets deepseek-v2-lite --parts mla-sweep --json mla.json  # MLA decode only

    python benchmarks/moe_gpu.py --json out.json                     # on the GPU machine
    python benchmarks/moe_gpu.py --device cpu --presets tiny-qwen3-moe,tiny-deepseek-v2 --batches 1,4 \\
        --context 32 --prompt-len 64 --prefill-tokens 128 --moe-batch 8 --mla-batch 4 --mla-context 64 \\
        --mla-extend-tokens 16 --mla-heads 16,32 --mla-quick    # rehearsal (TRITON_INTERPRET=1: mla-sweep's kernels)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention_kernels import ms as graph_ms  # noqa: E402
from benchmarks.engine_gpu import bench_engine_decode, bench_prefill, sync, timed  # noqa: E402
from benchmarks.mla_decode_sweep import add_arguments as add_sweep_arguments, copy_bandwidth, run_sweep  # noqa: E402
from cluster.engine.attention_context import AttentionContext  # noqa: E402
from cluster.engine.linear import linear  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.mla import (BACKEND_SWITCH as MLA_SWITCH, FRESH_PREFILL_SWITCH, latent_pages,  # noqa: E402
                                use_triton_mla)
from cluster.engine.model_config import PRESETS  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.engine.moe import SparseMoe, route, use_fused_moe  # noqa: E402
from cluster.engine.triton_attention import _num_sms  # noqa: E402

DENSE_REFERENCE = "llama-3.1-8b"
PARTS = ("engine", "moe", "mla-decode", "mla-extend", "mla-sweep")


def dense_kv_bytes_per_token(preset: str, element_size: int) -> int:
    cfg = PRESETS[preset]
    planes, heads, dim = cfg.kv_cache_shape
    return cfg.num_layers * planes * heads * dim * element_size


def bench_moe_layer(model, args, dtype) -> dict:
    layer = next(m for m in model.modules() if isinstance(m, SparseMoe))
    x = torch.randn(args.moe_batch, model.config.hidden_size, device=args.device, dtype=dtype)
    weights, ids = route(linear(x, layer.gate.weight), layer.moe)
    experts = layer.experts
    loop_ms = 1e3 * timed(lambda: experts.loop(x, weights, ids), args.reps * 10, args.device)
    row = {"moe_batch": args.moe_batch, "active_experts": int(ids.unique().numel()), "loop_ms": loop_ms,
           "fused_ms": None, "fused_speedup": None}
    if use_fused_moe(x):
        from cluster.engine.triton_moe import fused_experts
        fused = lambda: fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids)  # noqa: E731
        diff = (fused() - experts.loop(x, weights, ids)).abs().max().item()
        row["fused_ms"] = 1e3 * timed(fused, args.reps * 10, args.device)
        row.update(fused_speedup=loop_ms / row["fused_ms"], fused_max_abs_diff=diff)
    return row


def bench_mla_decode(runner, args) -> dict:
    """One layer's absorbed decode attention (W_UK, scores, softmax, weighted latents, W_UV), replayed from
    a CUDA graph as the engine's decode steps run it, and eagerly; the latent kernels alone (graph); the
    gathered torch path (eager)."""
    cfg, attn = runner.config, runner.model.layers[0].self_attn
    b, length = args.mla_batch, args.mla_context
    tables = [runner.page_allocator.allocate(-(-length // runner.page_size)) for _ in range(b)]
    ctx = AttentionContext.build([1] * b, [length - 1] * b, tables, [0] * b, runner.page_size, True, runner.device,
                                 None, runner.dtype, "torch")
    q_nope = torch.randn(b, cfg.num_heads, cfg.mla.qk_nope_head_dim, device=runner.device, dtype=runner.dtype)
    q_pe = torch.randn(b, cfg.num_heads, cfg.mla.qk_rope_head_dim, device=runner.device, dtype=runner.dtype)
    cache = runner.kv_caches[0][0]
    step = lambda: attn._decode_absorbed(q_nope, q_pe, cache, ctx)  # noqa: E731
    row = {"mla_batch": b, "mla_context": length, "mla_kernel": use_triton_mla(cache.device, cfg.mla),
           "mla_decode_ms": graph_ms(step, args.reps * 10),
           "mla_decode_eager_ms": 1e3 * timed(step, args.reps * 10, args.device), "mla_kernel_ms": None}
    if row["mla_kernel"]:   # the latent kernels alone, as the table configures them (mla-sweep: the candidates)
        from cluster.engine.triton_mla import decode_latent, head_block
        from cluster.engine.triton_mla_config import decode_config
        q_latent = torch.randn(b, cfg.num_heads, cfg.mla.kv_lora_rank, device=runner.device, dtype=runner.dtype)
        q_rope = torch.randn(b, cfg.num_heads, cfg.mla.qk_rope_head_dim, device=runner.device, dtype=runner.dtype)
        pages = latent_pages(ctx)
        row["mla_kernel_ms"] = graph_ms(lambda: decode_latent(q_latent, q_rope, cache[0], *pages, attn.scale),
                                        args.reps * 10)
        config = decode_config(cfg.num_heads, runner.dtype)
        block_h = config.block_h or head_block(cfg.num_heads, runner.dtype)
        row.update(mla_config=config.brief(), mla_block_h=block_h,
                   mla_splits=config.splits(b, -(-cfg.num_heads // block_h), _num_sms(cache.device)))
    os.environ[MLA_SWITCH] = "torch"   # the same step with the latents gathered (the CPU path)
    try:
        row["mla_gathered_ms"] = 1e3 * timed(step, args.reps * 10, args.device)
    finally:
        os.environ.pop(MLA_SWITCH)
    for t in tables:
        runner.page_allocator.free(t)
    latent_bytes = b * length * runner.kv_pool.head_dim * runner.kv_pool.kv.element_size()
    bandwidth = copy_bandwidth(args.device)
    floor_ms = 1e3 * latent_bytes / bandwidth
    row.update(latent_mb=latent_bytes / 1e6, copy_gb_s=bandwidth / 1e9, latent_read_ms=floor_ms,
               mla_ratio=row["mla_decode_ms"] / floor_ms,
               mla_kernel_ratio=row["mla_kernel_ms"] / floor_ms if row["mla_kernel_ms"] else None)
    return row


def bench_mla_extend(runner, args) -> dict:
    """One layer's expanded-form extend of `--mla-extend-batch` requests, `--mla-extend-tokens` new tokens
    each over a cached prefix of `--mla-context` tokens: the Triton kernel over the expanded pages
    (Triton context) against the gathered latents and SDPA with a mask (torch context), eager."""
    cfg, attn, m = runner.config, runner.model.layers[0].self_attn, runner.config.mla
    b, new, prefix = args.mla_extend_batch, args.mla_extend_tokens, args.mla_context
    tables = [runner.page_allocator.allocate(-(-(prefix + new) // runner.page_size)) for _ in range(b)]
    q_nope = torch.randn(b * new, cfg.num_heads, m.qk_nope_head_dim, device=runner.device, dtype=runner.dtype)
    q_pe = torch.randn(b * new, cfg.num_heads, m.qk_rope_head_dim, device=runner.device, dtype=runner.dtype)
    latent = torch.randn(b * new, m.kv_lora_rank + m.qk_rope_head_dim, device=runner.device, dtype=runner.dtype)
    cache = runner.kv_caches[0][0]
    row = {"mla_extend_batch": b, "mla_extend_tokens": new, "mla_extend_prefix": prefix}
    for backend in ("triton", "torch") if runner.attention_backend == "triton" else ("torch",):
        ctx = AttentionContext.build([new] * b, [prefix] * b, tables, [0] * b, runner.page_size, False, runner.device,
                                     None, runner.dtype, backend)
        row[f"mla_extend_{backend}_ms"] = 1e3 * timed(lambda: attn._extend_expanded(q_nope, q_pe, latent, cache, ctx),
                                                      args.reps * 3, args.device)
    if runner.attention_backend == "triton":   # the same prompts fresh: the prefill kernel against SDPA
        ctx = AttentionContext.build([new] * b, [0] * b, tables, [0] * b, runner.page_size, False, runner.device,
                                     None, runner.dtype, "triton")
        for name, switch in (("kernel", "kernel"), ("sdpa", "")):
            os.environ[FRESH_PREFILL_SWITCH] = switch
            row[f"mla_prefill_{name}_ms"] = 1e3 * timed(
                lambda: attn._extend_expanded(q_nope, q_pe, latent, cache, ctx), args.reps * 3, args.device)
        os.environ.pop(FRESH_PREFILL_SWITCH)
        row["mla_prefill_speedup"] = row["mla_prefill_sdpa_ms"] / row["mla_prefill_kernel_ms"]
    for t in tables:
        runner.page_allocator.free(t)
    if "mla_extend_triton_ms" in row:
        row["mla_extend_speedup"] = row["mla_extend_torch_ms"] / row["mla_extend_triton_ms"]
    return row


@torch.inference_mode()
def run_preset(preset: str, args) -> dict:
    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    info = {"preset": preset, "dtype": dtype_name}
    has_mla = PRESETS[preset].mla is not None
    if "mla-sweep" in args.parts and has_mla:   # no model: the latent kernels and one layer
        info.update(run_sweep(argparse.Namespace(**{**vars(args), "preset": preset, "batch": args.mla_batch,
                                                    "context": args.mla_context, "dtype": dtype_name})))
    if not args.parts & {"engine", "moe", "mla-decode", "mla-extend"}:
        return info
    batches = [int(b) for b in args.batches.split(",")]
    loaded = load_model(preset, path=preset, load_format="dummy", dtype=dtype_name, device=args.device)
    model, cfg = loaded.model, loaded.config
    dtype = model.embed_tokens.weight.dtype
    mla_tokens = args.mla_batch * (args.mla_context + args.page_size) if cfg.mla is not None else 0
    # NOTE: Qwen3-30B-A3B's 61 GB of weights leave an H100 about 15 GB: the pool takes only what is timed
    tokens = max(max(batches) * (args.context + args.decode_steps + 2 * args.page_size),
                 args.prefill_tokens + args.prompt_len, mla_tokens)
    runner = ModelRunner(loaded, num_pages=tokens // args.page_size + 16, page_size=args.page_size,
                         device=args.device, dtype=dtype_name, max_decode_batch=max(batches))
    runner.kv_pool.kv.normal_()   # KV content does not matter for speed
    info.update(backend=runner.attention_backend, cuda_graphs=runner.decode_graphs is not None,
                weights_gb=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9)
    if "engine" in args.parts:
        kv_per_token = runner.kv_pool.request_bytes(1)
        dense = dense_kv_bytes_per_token(DENSE_REFERENCE, runner.kv_pool.kv.element_size())
        info.update({"prefill_tok_s": bench_prefill(runner, args, 0), "kv_bytes_per_token": kv_per_token,
                     f"{DENSE_REFERENCE}_kv_bytes_per_token": dense, "kv_bytes_vs_dense": kv_per_token / dense})
        for batch in batches:
            ms = bench_engine_decode(runner, args, batch, args.context)
            info[f"decode_ms_b{batch}"] = ms
            info[f"decode_tok_s_b{batch}"] = 1e3 * batch / ms
    if "moe" in args.parts:
        info.update(bench_moe_layer(model, args, dtype))
    if "mla-decode" in args.parts and has_mla:
        info.update(bench_mla_decode(runner, args))
    if "mla-extend" in args.parts and has_mla:
        info.update(bench_mla_extend(runner, args))
    sync(args.device)
    print(json.dumps({k: v for k, v in info.items() if k != "mla_sweep"}), flush=True)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="qwen3-30b-a3b,deepseek-v2-lite")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="tokens per prefill forward")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=256, help="context tokens of the decode steps")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--moe-batch", type=int, default=64)
    ap.add_argument("--mla-batch", type=int, default=64)
    ap.add_argument("--mla-context", type=int, default=2048)
    ap.add_argument("--mla-extend-batch", type=int, default=4)
    ap.add_argument("--mla-extend-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--json", default="", help="write the per-preset results to this file")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    add_sweep_arguments(ap)
    args = ap.parse_args()
    args.parts = set(args.parts.split(","))
    if args.parts - set(PARTS):
        ap.error(f"unknown parts {sorted(args.parts - set(PARTS))}; known: {', '.join(PARTS)}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        from benchmarks.mla_decode_sweep import interpret_on_cpu
        interpret_on_cpu()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    results = []
    for preset in args.presets.split(","):
        t0 = time.perf_counter()
        results.append(run_preset(preset, args))
        results[-1]["wall_s"] = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
