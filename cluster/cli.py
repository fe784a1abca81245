"""`pdcluster` console script: launch | serve | worker | router | bench.

    pdcluster launch CONFIG [--port N] [--host H] [--log-dir DIR]
    pdcluster serve [MODEL_PATH] [--port N] [--host H] [--log-dir DIR]   # 1 prefill + 1 decode
    pdcluster worker --role R --config C --worker-id ID --router ENDPOINT [--log-dir DIR]
    pdcluster router --config C --control ENDPOINT [--port N]            # the router alone
    pdcluster bench --url URL [--num-requests N --prompt-len P --max-tokens M --concurrency C]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

from cluster.config import ROLE_PACKAGES, ConfigError, load_config


def _log_dir(arg) -> str:
    return arg or tempfile.mkdtemp(prefix="pdcluster-logs-")


def cmd_launch(args) -> int:
    from cluster import launcher
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"pdcluster: {e}", file=sys.stderr)
        return 2
    router = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    cfg = replace(cfg, router=replace(cfg.router, **router))
    return launcher.run(cfg, args.config, _log_dir(args.log_dir))


def cmd_serve(args) -> int:
    """One prefill + one decode worker for MODEL_PATH (default: the embedded model)."""
    lines = ["[model]", f"name = {json.dumps(args.model_name)}",
             f"path = {json.dumps(os.path.abspath(args.model_path) if args.model_path else '')}",
             "[router]", f"host = {json.dumps(args.host)}", f"port = {args.port}",
             "[[prefill]]", "count = 1", "[[decode]]", "count = 1"]
    log_dir = _log_dir(args.log_dir)
    path = os.path.join(log_dir, "serve.toml")        # workers and router read the same file
    os.makedirs(log_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    args.config = path
    args.log_dir = log_dir
    args.port = args.host = None
    return cmd_launch(args)


def cmd_worker(args, rest: list[str]) -> int:
    name = ROLE_PACKAGES[args.role]
    module = importlib.import_module(name if "." in name else f"{name}.__main__")
    return int(module.main(rest) or 0)


def cmd_router(rest: list[str]) -> int:
    from cluster.router.__main__ import main
    return main(rest)


# ---------------------------------------------------------------- bench (OpenAI API load)

async def _one_request(client, args, prompt: str) -> dict:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, num_tokens, error = [], 0, None
    try:
        async with client.stream("POST", "/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"].get("message")
                elif event.get("usage"):
                    num_tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error or not arrivals:
        return {"error": error or "no tokens"}
    itl = [(b - a) for a, b in zip(arrivals, arrivals[1:])]
    return {"ttft": arrivals[0] - start, "itl": itl, "e2e": end - start,
            "num_tokens": num_tokens or len(arrivals)}


async def _bench(args) -> dict:
    import httpx
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    base = args.url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(600.0)) as client:
        if args.model is None:
            args.model = (await client.get("/models")).json()["data"][0]["id"]
        words = ("alpha", "beta", "gamma", "delta", "omega")
        gate = asyncio.Semaphore(args.concurrency)

        async def run(i: int):
            prompt = " ".join(words[(i + k) % len(words)] for k in range(args.prompt_len))
            async with gate:
                return await _one_request(client, args, prompt)
        start = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(args.num_requests)))
        duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ms = lambda xs, q: round(1000 * _quantile(xs, q), 2) if xs else None  # noqa: E731
    ttft, itl = [r["ttft"] for r in ok], [x for r in ok for x in r["itl"]]
    e2e = [r["e2e"] for r in ok]
    num_tokens = sum(r["num_tokens"] for r in ok)
    return {"model": args.model, "num_requests": args.num_requests, "num_ok": len(ok),
            "num_failed": len(results) - len(ok), "concurrency": args.concurrency,
            "duration_s": round(duration, 3), "output_tokens": num_tokens,
            "output_tok_per_s": round(num_tokens / duration, 2) if duration else 0.0,
            "requests_per_s": round(len(ok) / duration, 3) if duration else 0.0,
            "ttft_ms_mean": round(1000 * statistics.fmean(ttft), 2) if ttft else None,
            "ttft_ms_p50": ms(ttft, 0.5), "ttft_ms_p99": ms(ttft, 0.99),
            "itl_ms_mean": round(1000 * statistics.fmean(itl), 2) if itl else None,
            "itl_ms_p50": ms(itl, 0.5), "itl_ms_p99": ms(itl, 0.99),
            "e2e_ms_p50": ms(e2e, 0.5), "e2e_ms_p99": ms(e2e, 0.99),
            "errors": sorted({r["error"] for r in results if "error" in r})[:5]}


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def cmd_bench(args) -> int:
    report = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{width}}  {v}")
    return 0 if report["num_ok"] == report["num_requests"] else 1


# ---------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdcluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="start a whole cluster from a TOML config")
    p.add_argument("config")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--log-dir", default=None, help="default: a new temp directory")
    p = sub.add_parser("serve", help="1 prefill + 1 decode worker, no config file")
    p.add_argument("model_path", nargs="?", default="")
    p.add_argument("--model-name", default="smollm2-135m-instruct")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--log-dir", default=None)
    p = sub.add_parser("worker", help="one worker process (same as python -m <package>)")
    p.add_argument("--role", required=True, choices=sorted(ROLE_PACKAGES))
    sub.add_parser("router", help="the router alone (python -m cluster.router)", add_help=False)
    p = sub.add_parser("bench", help="OpenAI-API load generator: TTFT, ITL, output tok/s")
    p.add_argument("--url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="default: the first of /v1/models")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in words")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""))
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["router"]:
        return cmd_router(argv[1:])
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "worker":
        return cmd_worker(args, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return {"launch": cmd_launch, "serve": cmd_serve, "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
