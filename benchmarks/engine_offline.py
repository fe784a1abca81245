"""Offline engine throughput vs transformers `generate`, and vs the GEMM-only floor (CPU).

One process, one run: the same N requests (random prompt ids, greedy, EOS ignored) go
through `LLM.generate` and through transformers' batched, left-padded `generate` on the
same GGUF weights in float32. The GEMM floor replays only the matmuls of every forward the
engine ran (same shapes, the model's own weights, all layers so weights stream from
memory as in the real run); engine time as a fraction of it shows the non-GEMM overhead.

    python benchmarks/engine_offline.py                       # 64 x (256 in, 128 out)
    python benchmarks/engine_offline.py --num-requests 8 --output-len 16 --skip-hf
    python benchmarks/engine_offline.py --write-md            # update BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine.linear import USE_ONEDNN, linear  # noqa: E402
from cluster.engine.llm import LLM  # noqa: E402
from cluster.engine.model_files import default_gguf_path  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402

SECTION = "## Engine offline (CPU)"


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(17, vocab, (length,), generator=g).tolist() for _ in range(n)]   # 0..16 are specials


def run_engine(args, prompts):
    llm = LLM(num_pages=len(prompts) * -(-(args.prompt_len + args.output_len) // args.page_size) + 8,
              page_size=args.page_size, max_batch_size=max(len(prompts), 1),
              max_prefill_tokens=args.max_prefill_tokens)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))   # warm-up
    forwards: list[tuple[int, int, bool, float, int]] = []   # (tokens, sampled rows, decode?, seconds, KV read)
    forward = llm.runner.forward

    def timed(fi):
        t0 = time.perf_counter()
        out = forward(fi)
        kv_tokens = sum(fi.prefix_lens) + fi.num_tokens if fi.is_decode else 0
        forwards.append((fi.num_tokens, sum(fi.sample), fi.is_decode, time.perf_counter() - t0, kv_tokens))
        return out
    llm.runner.forward = timed
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.output_len, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    llm.runner.forward = forward
    return llm, outs, elapsed, forwards


def run_hf(args, prompts):
    from transformers import AutoModelForCausalLM
    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None   # ignore EOS, like the engine run
    pad = 2
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])          # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
    with torch.inference_mode():
        model.generate(ids[:2, :8], attention_mask=mask[:2, :8], **{**kw, "max_new_tokens": 2})   # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        elapsed = time.perf_counter() - t0
    return out[:, width:].tolist(), elapsed


@torch.inference_mode()
def gemm_floor(llm, forwards) -> float:
    """Seconds the engine's forwards spend in matmuls alone: each distinct (tokens, sampled rows)
    forward shape is replayed through every layer's projections and the LM head with the
    engine's own GEMM (`cluster.engine.linear`), timed, and multiplied by how often it ran."""
    model = llm.loaded.model
    cfg = llm.loaded.config
    lm_head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    timings: dict[tuple[int, int], float] = {}
    for tokens, rows, *_ in forwards:
        if (tokens, rows) in timings:
            continue
        x = torch.randn(tokens, cfg.hidden_size)
        xq = torch.randn(tokens, cfg.q_size)
        h = torch.randn(tokens, cfg.intermediate_size)

        def chain():
            for layer in model.layers:
                linear(x, layer.self_attn.qkv_proj.weight)
                linear(xq, layer.self_attn.o_proj.weight)
                linear(x, layer.mlp.gate_up_proj.weight)
                linear(h, layer.mlp.down_proj.weight)
            if rows:
                linear(x[:rows], lm_head)
        chain()
        reps = 3 if tokens < 512 else 1
        t0 = time.perf_counter()
        for _ in range(reps):
            chain()
        timings[(tokens, rows)] = (time.perf_counter() - t0) / reps
    return sum(timings[(t, r)] for t, r, *_ in forwards)


def kv_read_floor(llm, forwards) -> float:
    """Seconds decode must spend just reading its KV (every step reads each request's whole
    K and V), at the read bandwidth of a large `sum` over memory."""
    big = torch.ones(1 << 27)   # 512 MiB
    big.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        big.sum()
    bandwidth = 3 * big.numel() * 4 / (time.perf_counter() - t0)
    cfg = llm.loaded.config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    return sum(f[4] for f in forwards) * per_token / bandwidth


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown"


def write_markdown(text: str, path: str) -> None:
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        old = old[:start].rstrip("\n") + ("\n\n" + old[nxt + 1:] if nxt >= 0 else "")
    with open(path, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-prefill-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--skip-hf", action="store_true", help="engine and GEMM floor only")
    ap.add_argument("--write-md", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    num_out = args.num_requests * args.output_len

    prompts = make_prompts(args.num_requests, args.prompt_len, 49152)   # SmolLM2's vocabulary
    llm, outs, eng_s, forwards = run_engine(args, prompts)
    assert all(len(o.token_ids) == args.output_len for o in outs)
    prefill_s = sum(f[3] for f in forwards if not f[2])
    decode_s = sum(f[3] for f in forwards if f[2])
    floor_s = gemm_floor(llm, forwards)
    kv_s = kv_read_floor(llm, forwards)
    eng_tps = num_out / eng_s
    lines = [
        f"workload: {args.num_requests} requests x ({args.prompt_len} prompt + {args.output_len} output) tokens, "
        f"greedy, EOS ignored, float32, {torch.get_num_threads()} threads, engine GEMM: "
        f"{'oneDNN' if USE_ONEDNN else 'torch default (MKL)'}",
        f"engine:        {eng_s:7.1f} s  {eng_tps:7.1f} output tok/s  (prefill {prefill_s:.1f} s, "
        f"{sum(f[0] for f in forwards if not f[2]) / max(prefill_s, 1e-9):.0f} tok/s; "
        f"decode {decode_s:.1f} s, {1e3 * decode_s / max(1, sum(f[2] for f in forwards)):.0f} ms/step)",
        f"GEMM floor:    {floor_s:7.1f} s  (matmuls alone at the engine's shapes); "
        f"engine reaches {100 * floor_s / eng_s:.0f}% of it",
        f"+ KV reads:    {floor_s + kv_s:7.1f} s  (decode reading each request's K/V once per step at memory "
        f"read bandwidth: {kv_s:.1f} s); engine reaches {100 * (floor_s + kv_s) / eng_s:.0f}% of it",
    ]
    if not args.skip_hf:
        hf_ids, hf_s = run_hf(args, prompts)
        same = sum(o.token_ids == h for o, h in zip(outs, hf_ids))
        lines += [f"transformers:  {hf_s:7.1f} s  {num_out / hf_s:7.1f} output tok/s (batched generate, left-padded)",
                  f"engine / transformers: {eng_tps / (num_out / hf_s):.2f}x; identical greedy outputs: "
                  f"{same}/{len(outs)}"]
    print("\n".join(lines))
    if args.write_md:
        cmd = "python benchmarks/engine_offline.py " + " ".join(sys.argv[1:])
        md = "\n".join([SECTION, "", f"- machine: {cpu_model()}, {os.cpu_count()} cores (shared), torch "
                        f"{torch.__version__}", f"- date: {datetime.date.today()}", f"- command: `{cmd}`", "",
                        "```", *lines, "```"])
        write_markdown(md, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "BENCHMARKS.md"))


if __name__ == "__main__":
    main()
