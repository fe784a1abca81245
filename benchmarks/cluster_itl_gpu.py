"""Inter-token latency through the whole cluster on one GPU against the engine's own decode step.

Dummy Llama-3.2-1B-shaped weights with the vocabulary of the tokenizer given (the default model's,
so the router can detokenize), bfloat16. First the engine alone (`ModelRunner`, as in
engine_gpu.py) at batch 1 and 64; then a unified cluster and a 1 prefill + 1 decode cluster on
the same GPU, each measured by `pdcluster bench`'s streaming client at concurrency 1 and 64.

    python benchmarks/cluster_itl_gpu.py --tokenizer-json tokenizer.json --out results/
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.bench import cli as bench  # noqa: E402
from cluster.engine.model_config import PRESETS  # noqa: E402

PORT = 8123
LAYOUTS = {"unified": "[[unified]]\ncount = 1\n", "1p1d": "[[prefill]]\ncount = 1\n\n[[decode]]\ncount = 1\n"}


def write_model_dir(path: str, tokenizer_json: str, preset: str) -> None:
    from tokenizers import Tokenizer
    os.makedirs(path, exist_ok=True)
    shutil.copy(tokenizer_json, os.path.join(path, "tokenizer.json"))
    c = PRESETS[preset]
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": Tokenizer.from_file(tokenizer_json).get_vocab_size(), "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
          "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
          "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
          "max_position_embeddings": 8192, "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": 1,
          "eos_token_id": 2}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)


def write_config(path: str, model_dir: str, layout: str, device: str, dtype: str) -> None:
    with open(path, "w") as f:
        f.write(f'[model]\nname = "llama-1b-dummy"\npath = "{model_dir}"\nload_format = "dummy"\n'
                f'dtype = "{dtype}"\ndevice = "{device}"\n\n[router]\nport = {PORT}\n\n'
                f'[scheduler]\nnum_pages = 8192\nmax_running_requests = 64\n\n{LAYOUTS[layout]}')


def engine_steps(model_dir: str, context: int, device: str, dtype: str, concurrency: int) -> dict:
    import torch
    from benchmarks.engine_gpu import bench_engine_decode
    from cluster.engine.loader import load_model
    from cluster.engine.model_runner import ModelRunner
    loaded = load_model("llama-1b-dummy", path=model_dir, load_format="dummy", dtype=dtype, device=device)
    runner = ModelRunner(loaded, 8192, 16, device, dtype, max_decode_batch=64)
    args = argparse.Namespace(decode_steps=32, device=device)
    out = {f"engine_b{b}_ms": bench_engine_decode(runner, args, b, context) for b in (1, concurrency)}
    del runner, loaded
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def summary(results: list[dict], duration: float) -> dict:
    """ITL is the gap between two arrivals of text at the client; an arrival may carry several tokens
    when the router fell behind, so tokens per arrival and each request's decode time per token
    (first to last arrival over its tokens after the first) are given too."""
    ok = [r for r in results if "error" not in r]
    itl = sorted(x for r in ok for x in r["itl"])
    per_token = sorted((r["arrivals"][-1] - r["arrivals"][0]) / max(1, r["num_tokens"] - 1) for r in ok)
    tokens, arrivals = sum(r["num_tokens"] for r in ok), sum(len(r["arrivals"]) for r in ok)
    ms = lambda xs, q: round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None  # noqa: E731
    return {"num_ok": len(ok), "num_failed": len(results) - len(ok), "output_tok_s": round(tokens / duration),
            "ttft_ms_p50": ms(sorted(r["ttft"] for r in ok), 0.5), "itl_ms_p50": ms(itl, 0.5),
            "itl_ms_mean": round(1e3 * sum(itl) / len(itl), 3) if itl else None, "itl_ms_p99": ms(itl, 0.99),
            "tokens_per_arrival": round(tokens / arrivals, 2) if arrivals else None,
            "ms_per_token_p50": ms(per_token, 0.5),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3]}


def wait_ready(proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:   # 503 until every worker has registered
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"cluster not ready in {timeout_s} s")


def stop_launcher(proc) -> None:
    """SIGINT to the launcher's own session (it and its workers); SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def measure(layout: str, model_dir: str, args) -> dict:
    out, max_tokens = args.out, args.max_tokens
    cfg = os.path.join(out, f"{layout}.toml")
    write_config(cfg, model_dir, layout, args.device, args.dtype)
    logs = os.path.join(out, f"logs_{layout}")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "launch", cfg, "--log-dir", logs],
                            start_new_session=True)
    try:
        wait_ready(proc, 240)
        result = {}
        for conc, num in ((1, 8), (args.concurrency, 2 * args.concurrency)):
            a = argparse.Namespace(url=f"http://127.0.0.1:{PORT}/v1", model=None, num_requests=num, prompt_len=32,
                                   max_tokens=max_tokens, concurrency=conc, api_key="", json=True)
            asyncio.run(bench.run_closed_loop(argparse.Namespace(**{**vars(a), "num_requests": conc, "max_tokens": 8})))
            result[f"c{conc}"] = summary(*asyncio.run(bench.run_closed_loop(a)))   # after a short warm-up round
            print(layout, conc, json.dumps(result[f"c{conc}"]), flush=True)
        return result
    finally:
        stop_launcher(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer-json", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--layouts", default="unified,1p1d")
    ap.add_argument("--concurrency", type=int, default=64, help="the second load level (the first is 1)")
    ap.add_argument("--preset", default="llama-3.2-1b", help="shapes; the vocabulary is the tokenizer's")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # a timeout still stops the clusters (finally)
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.abspath(os.path.join(args.out, "model"))
    write_model_dir(model_dir, args.tokenizer_json, args.preset)
    report = engine_steps(model_dir, 32 + args.max_tokens // 2, args.device, args.dtype, args.concurrency)
    print(json.dumps(report), flush=True)
    for layout in args.layouts.split(","):
        try:
            report[layout] = measure(layout, model_dir, args)
        except Exception as e:   # one layout failing still reports the other
            report[layout] = {"error": f"{type(e).__name__}: {e}"}
            print(layout, report[layout], flush=True)
    with open(os.path.join(args.out, "cluster_itl.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
