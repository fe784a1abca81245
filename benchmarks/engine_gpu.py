"""Engine speed on a CUDA machine with dummy weights, against a yardstick measured in the same run.

Per preset (default: Llama-3.1-8B and Llama-3.2-1B shapes, bfloat16):
- decode ms/step of the engine (`ModelRunner.forward`: paged KV, CUDA graphs, future tokens, the
  sampled ids copied to the host every step, as a worker runs it) at each context and batch;
- the yardstick at the same shapes: a bare torch decode step with the same weights, no paging
  (contiguous KV per layer, attention as SDPA with the G query heads of a KV head as G queries),
  argmax, captured as one CUDA graph and replayed back to back, never copying to the host;
- prefill tokens/s on 2k-token prompts (from position 0: SDPA; and a second 1k chunk over a 1k
  cached prefix: the Triton extend kernel) as a share of the measured bf16 matmul rate.

    python benchmarks/engine_gpu.py --json out.json                   # on the GPU machine
    python benchmarks/engine_gpu.py --profile trace_dir               # + a torch profiler trace of decode steps
    python benchmarks/engine_gpu.py --device cpu --presets tiny-llama --batches 1,4 --contexts 64  # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine.forward_batch import ForwardInput  # noqa: E402
from cluster.engine.loader import load_model  # noqa: E402
from cluster.engine.model_runner import ModelRunner  # noqa: E402
from cluster.engine.rotary import apply_rope  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=1 << 20, ignore_eos=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, reps: int, device: str) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def matmul_rate(device: str, m: int, k: int, n: int, dtype) -> float:
    """FLOP/s of one [m, k] @ [k, n] GEMM (the MLP's gate/up shape at a prefill's token count)."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    return 2 * m * k * n / timed(lambda: F.linear(a, b), 10, device)


def forward_input(ids, extend_lens, prefix_lens, tables, is_decode, future_slots=()) -> ForwardInput:
    n = len(extend_lens)
    return ForwardInput(input_ids=torch.tensor(ids, dtype=torch.int64), extend_lens=extend_lens,
                        prefix_lens=prefix_lens, page_tables=tables, sample=[True] * n, sampling=[GREEDY] * n,
                        is_decode=is_decode, future_slots=list(future_slots))


def prefill_flops_per_token(cfg, prompt_len: int) -> float:
    linear = cfg.hidden_size * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * cfg.hidden_size + \
        3 * cfg.hidden_size * cfg.intermediate_size
    attn = 2 * cfg.num_heads * cfg.head_dim * prompt_len / 2   # QK^T and PV over half the prompt (causal)
    return cfg.num_layers * 2 * (linear + attn)


def bench_prefill(runner, args, prefix: int) -> float:
    """Tokens/s of forwards of `prompt_len - prefix` new tokens per prompt after `prefix` cached ones."""
    g = torch.Generator().manual_seed(0)
    per_forward = max(1, args.prefill_tokens // args.prompt_len)
    pages = -(-args.prompt_len // runner.page_size)
    tables = [runner.page_allocator.allocate(pages) for _ in range(per_forward)]
    new = args.prompt_len - prefix
    ids = torch.randint(0, runner.config.vocab_size, (per_forward * new,), generator=g).tolist()
    fi = forward_input(ids, [new] * per_forward, [prefix] * per_forward, tables, False)
    s = timed(lambda: runner.forward(fi), args.reps, args.device)
    for t in tables:
        runner.page_allocator.free(t)
    return per_forward * new / s


def bench_engine_decode(runner, args, batch: int, context: int, overlap: bool = False) -> float:
    """ms per step over `decode_steps` steps, each feeding back the previous step's tokens as futures.
    Each step's tokens are read on the host; `overlap`: only after the next step is launched (as the
    overlap scheduler does), else before (as the forward thread does today: one wait per step)."""
    steps = args.decode_steps
    tables = [runner.page_allocator.allocate(-(-(context + steps + 1) // runner.page_size)) for _ in range(batch)]
    slots = list(range(batch))
    runner.forward(forward_input([1] * batch, [1] * batch, [context - 1] * batch, tables, True, slots))
    fis = [forward_input([-(s + 1) for s in slots], [1] * batch, [context + i] * batch, tables, True, slots)
           for i in range(steps)]   # built beforehand, as a scheduler does on its own thread
    runner.forward(fis[0])
    sync(args.device)
    t0 = time.perf_counter()
    pending = None
    for fi in fis:
        out = runner.forward(fi, wait=not overlap)
        if pending is not None:
            pending.wait().next_token_ids.tolist()
        pending = out
    pending.wait().next_token_ids.tolist()
    sync(args.device)
    for t in tables:
        runner.page_allocator.free(t)
    return 1e3 * (time.perf_counter() - t0) / steps


class Yardstick:
    """A bare decode step at fixed shapes: the model's weights, contiguous KV `[B, kvh, L, D]` per layer."""

    def __init__(self, model, batch: int, context: int, device: str):
        cfg = model.config
        self.model, self.cfg, self.batch, self.context = model, cfg, batch, context
        dtype = model.embed_tokens.weight.dtype
        shape = (cfg.num_layers, 2, batch, cfg.num_kv_heads, context + 1, cfg.head_dim)
        self.kv = torch.randn(shape, device=device, dtype=dtype)
        self.ids = torch.ones(batch, dtype=torch.int64, device=device)
        self.positions = torch.full((batch,), context, dtype=torch.int64, device=device)

    def step(self) -> torch.Tensor:
        cfg, m, b = self.cfg, self.model, self.batch
        x = m.embed_tokens(self.ids)
        cos, sin = m.rope.lookup(self.positions, x.dtype)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            qkv = F.linear(h, attn.qkv_proj.weight, attn.qkv_proj.bias).view(b, -1, cfg.head_dim)
            qk = apply_rope(qkv[:, :cfg.num_heads + cfg.num_kv_heads], cos, sin)
            q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)
            v = qkv[:, cfg.num_heads + cfg.num_kv_heads:]
            kc, vc = self.kv[i, 0], self.kv[i, 1]
            kc[:, :, self.context] = k
            vc[:, :, self.context] = v
            qg = q.reshape(b, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
            o = F.scaled_dot_product_attention(qg, kc, vc, scale=attn.scale)
            x = x + F.linear(o.reshape(b, -1), attn.o_proj.weight)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.compute_logits(m.norm(x), upcast=False).argmax(dim=-1)

    def ms_per_step(self, steps: int) -> float:
        if self.kv.device.type != "cuda":   # smoke runs: eager
            return 1e3 * timed(self.step, steps, "cpu")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        return 1e3 * timed(graph.replay, steps, "cuda")


def profile_decode(runner, args, batch: int, context: int, out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    os.makedirs(out_dir, exist_ok=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench_engine_decode(runner, argparse.Namespace(**{**vars(args), "decode_steps": 8}), batch, context)
    path = os.path.join(out_dir, f"decode_{runner.config.num_layers}l_b{batch}_c{context}.json")
    prof.export_chrome_trace(path)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(f"trace: {path}")


@torch.inference_mode()
def run_preset(preset: str, args, rows: list) -> dict:
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    loaded = load_model(preset, path=preset, load_format="dummy", dtype=dtype, device=args.device)
    cfg = loaded.config
    tokens = max(max(batches) * (max(contexts) + args.decode_steps + 2 * args.page_size),
                 args.prefill_tokens + args.prompt_len)
    t0 = time.perf_counter()
    runner = ModelRunner(loaded, num_pages=tokens // args.page_size + 16, page_size=args.page_size,
                         device=args.device, dtype=dtype, max_decode_batch=max(batches))
    startup_s = time.perf_counter() - t0
    runner.kv_pool.kv.normal_()   # KV content does not matter for speed
    graphs = runner.decode_graphs
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    rate = matmul_rate(args.device, args.prefill_tokens, cfg.hidden_size, 2 * cfg.intermediate_size,
                       loaded.model.embed_tokens.weight.dtype)
    flops = prefill_flops_per_token(cfg, args.prompt_len)
    prefill = bench_prefill(runner, args, 0)
    chunked = bench_prefill(runner, args, args.prompt_len // 2)
    info = {"preset": preset, "dtype": dtype, "weights_gb": weight_bytes / 1e9, "backend": runner.attention_backend,
            "runner_startup_s": startup_s, "graph_capture_s": graphs.capture_s if graphs else None,
            "graph_capture_mib": graphs.capture_bytes / 2 ** 20 if graphs else None,
            "matmul_tflops": rate / 1e12, "prefill_tok_s": prefill, "prefill_share_of_matmul": prefill * flops / rate,
            "chunked_prefill_tok_s": chunked}
    print(json.dumps(info), flush=True)
    for context in contexts:
        for batch in batches:
            engine = bench_engine_decode(runner, args, batch, context)
            overlapped = bench_engine_decode(runner, args, batch, context, overlap=True)
            yard = Yardstick(loaded.model, batch, context, args.device).ms_per_step(args.decode_steps)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            row = {"preset": preset, "batch": batch, "context": context, "engine_ms": engine, "yardstick_ms": yard,
                   "ratio": engine / yard, "engine_tok_s": 1e3 * batch / engine, "yardstick_tok_s": 1e3 * batch / yard,
                   "engine_overlap_ms": overlapped, "overlap_ratio": overlapped / yard}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.profile:
        profile_decode(runner, args, batches[-1], contexts[0], args.profile)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="llama-3.1-8b,llama-3.2-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="", help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="tokens per prefill forward")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="1024,256")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--profile", default="", help="directory for a torch profiler trace of decode steps")
    ap.add_argument("--json", default="", help="write presets and rows to this file")
    args = ap.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    rows, infos = [], []
    for preset in args.presets.split(","):
        infos.append(run_preset(preset, args, rows))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("\n| model · batch · context | engine ms/step | yardstick ms/step | ratio | engine tok/s | yardstick tok/s "
          "| engine overlapped ms/step | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} · {r['batch']} · {r['context']} | {r['engine_ms']:.2f} | {r['yardstick_ms']:.2f} | "
              f"{r['ratio']:.2f}x | {r['engine_tok_s']:,.0f} | {r['yardstick_tok_s']:,.0f} | "
              f"{r['engine_overlap_ms']:.2f} | {r['overlap_ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "presets": infos, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
