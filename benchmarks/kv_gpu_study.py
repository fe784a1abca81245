"""TTFT split per KV transfer backend, and goodput of 1P1D vs unified workers.

    python benchmarks/kv_gpu_study.py --model-dir DIR --out OUT [--deadline-s S]

`ttft`: per backend (`--backends`; `NAME+layerwise` turns layer-wise streaming on, `NAME+auto`
leaves it to `layerwise = "auto"`, plain `NAME` turns it off), a 1 prefill
(GPU 0) + 1 decode (GPU 1) cluster, requests one at a time at each of `--ttft-prompt-lens`
(default 2k and 8k tokens; 8 output tokens): medians of each request's own phases, as the
router assembled them from the workers' marks (GET /debug/requests/{x-request-id}): queue
(router + prefill), prefill forward, KV transfer, first decode step, and client TTFT.
`goodput`: DistServe style, `pdcluster bench --request-rate` logic (cluster/bench/goodput.py):
Poisson arrivals at each rate, 2k-token prompts, 256 output tokens, SLO TTFT <= 1 s and mean
inter-token time <= 50 ms, at each of `--rates` (stops a layout past saturation or at the
deadline), for 1P1D on 2 GPUs (`--layerwise`: with layer-wise streaming), 2 unified workers on
the 2 GPUs and 1 unified on 1 GPU. Writes OUT/kv_gpu_study.json (after every cluster) and
OUT/slo_attainment.png. `--device cpu` rehearses it all on a CPU with the tiny model (backends
zmq/shm, no GPUs); benchmarks/kv_gpu_run.sh runs it on the GPU host.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Cluster, metric_values  # noqa: E402

from cluster.bench import goodput as bench_goodput  # noqa: E402
from cluster.bench.client import cycled_prompt  # noqa: E402


def config(args, groups: str, backend: str = "auto", layerwise=False) -> str:
    gpu = args.device == "cuda"
    max_len = max(4096, max(args.ttft_lens + [args.prompt_len]) + args.max_tokens + 64)
    return f"""
[model]
name = "dummy"
path = "{os.path.abspath(args.model_dir)}"
load_format = "dummy"
dtype = "{'bfloat16' if gpu else 'float32'}"
device = "{args.device}"
max_model_len = {max_len}

[scheduler]
num_pages = {args.num_pages}
max_running_requests = {args.max_running}
max_prefill_tokens = {max(8192, max(args.ttft_lens) + 64)}

[timeouts]
register = 300

[cache]
prefix_cache = false      # cycled-word prompts would otherwise be prefix hits: measure uncached prefill

[kv_transfer]
backend = "{backend}"
layerwise = {'"auto"' if layerwise == "auto" else str(layerwise).lower()}

{groups}
"""


def groups(args, layout: str) -> str:
    gpus = lambda g: f"gpus = {g}\n" if args.device == "cuda" else ""  # noqa: E731
    return {"1p1d": "[[prefill]]\n" + gpus("[0]") + "[[decode]]\n" + gpus("[1]"),
            "2 unified": "[[unified]]\ncount = 2\n" + gpus("[0, 1]"),
            "1 unified": "[[unified]]\n" + gpus("[0]")}[layout]


async def _one(c: Cluster, p: str, max_tokens: int) -> dict:
    import httpx
    from cluster.bench.client import one_request
    args = argparse.Namespace(model="dummy", max_tokens=max_tokens)
    async with httpx.AsyncClient(base_url=c.base_url + "/v1", timeout=300) as client:
        return await one_request(client, args, p)


def ttft_split(args, name: str, out: dict) -> None:
    """`name`: a backend, `+layerwise` / `+auto` for layer-wise streaming on / auto; one cluster,
    every prompt length."""
    backend, _, mode = name.partition("+")
    cfg = config(args, groups(args, "1p1d"), backend, layerwise="auto" if mode == "auto" else mode == "layerwise")
    with Cluster(cfg, f"ttft-{backend}{'-' + mode if mode else ''}") as c:
        for n in args.ttft_lens:
            key = f"{name}@{n}"
            out[key] = measure_ttft(c, args, n)
            print(f"ttft {key}: {out[key]}", flush=True)


def measure_ttft(c: Cluster, args, prompt_len: int = 0) -> dict:
    """Medians over `--ttft-requests` requests sent one at a time, from each request's own
    phases (the router's GET /debug/requests/{id}), plus client TTFT and kv_ack_ms (prefill's
    kv_transfer_seconds: first bytes sent -> kv_ack; with layer-wise streaming the first layer
    leaves during the forward, so this overlaps `prefill_forward_ms`)."""
    prompt_len = prompt_len or args.prompt_len
    for i in range(2):
        asyncio.run(_one(c, cycled_prompt(100 + i, prompt_len), 4))       # warm up
    m0 = metric_values(c.metrics(), "pdcluster:kv_transfer_seconds_sum")
    k0 = metric_values(c.metrics(), "pdcluster:kv_transfer_seconds_count")
    results = []
    for i in range(args.ttft_requests):
        r = asyncio.run(_one(c, cycled_prompt(i, prompt_len), 8))
        if "error" in r:
            raise RuntimeError(r["error"])
        results.append(r)
    time.sleep(args.heartbeat_s)                 # the last acks reach /metrics with a heartbeat
    s1 = metric_values(c.metrics(), "pdcluster:kv_transfer_seconds_sum")
    k1 = metric_values(c.metrics(), "pdcluster:kv_transfer_seconds_count")
    kv_ack = (sum(s1.values()) - sum(m0.values())) / max(1, sum(k1.values()) - sum(k0.values()))
    splits = [phase_split(_trace(c, r["request_id"]), r["ttft"]) for r in results]
    out = {key: _median([s[key] for s in splits]) for key in splits[0]}
    return {**out, "kv_ack_ms": round(1000 * kv_ack, 2), "requests": len(results)}


def phase_split(trace: dict, client_ttft_s: float) -> dict:
    """One request's TTFT parts in ms from its /debug/requests trace (route pd). The first token
    reaches the router after `kv_transfer` (the prefill worker sampled it, decode emits it once
    the KV landed); `first_decode_ms` (decode_queue + first_decode) is decode's first step,
    which makes the second token; `client_rest_ms` = client TTFT - the router's first token
    (HTTP, tokenize before arrival, streaming back). Missing phases read NaN."""
    d = {p["phase"]: p["duration_s"] for p in trace["phases"] if p["duration_s"] is not None}
    nan = float("nan")
    ms = lambda *names: round(1000 * sum(d.get(n, nan) for n in names), 2)   # noqa: E731
    first = trace["tokens"][0]["t_s"] if trace.get("tokens") else nan
    return {"ttft_ms_p50": round(1000 * client_ttft_s, 2), "queue_ms": ms("router_queue", "prefill_queue"),
            "prefill_forward_ms": ms("prefill_forward"), "kv_transfer_ms": ms("kv_transfer"),
            "first_token_at_router_ms": round(1000 * first, 2),
            "first_decode_ms": ms("decode_queue", "first_decode"),
            "client_rest_ms": round(1000 * (client_ttft_s - first), 2)}


def _trace(c: Cluster, rid: str) -> dict:
    import httpx
    r = httpx.get(f"{c.base_url}/debug/requests/{rid}", timeout=10)
    r.raise_for_status()
    return r.json()


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]               # NaN: a phase the trace did not have
    return round(statistics.median(xs), 2) if xs else float("nan")


def goodput(args, layout: str, out: dict, ttft_out: dict, deadline: float) -> None:
    backend, layerwise = "auto", args.layerwise and layout == "1p1d"
    with Cluster(config(args, groups(args, layout), backend, layerwise), f"goodput-{layout.replace(' ', '')}") as c:
        if layout == "1p1d":                     # the auto backend's TTFT split, before the load
            ttft_out["auto"] = measure_ttft(c, args)
            print(f"ttft auto: {ttft_out['auto']}", flush=True)
        for i in range(4):
            asyncio.run(_one(c, cycled_prompt(200 + i, args.prompt_len), 8))       # warm up every worker
        bench_args = argparse.Namespace(
            url=c.base_url + "/v1", model="dummy", api_key="", request_rate=args.rates, num_requests=0,
            prompt_len=args.prompt_len, max_tokens=args.max_tokens, slo_ttft=args.slo_ttft,
            slo_tpot=args.slo_tpot, attainment=0.9, seed=0, json=None, plot=None, concurrency=None)
        rows = []
        for rate in bench_goodput.parse_rates(args.rates):
            if time.monotonic() > deadline and rows:
                out.setdefault("skipped_rates", {}).setdefault(layout, []).append(rate)
                continue
            bench_args.request_rate = str(rate)
            bench_args.num_requests = max(4, int(rate * args.seconds_per_rate))
            report = asyncio.run(bench_goodput.sweep(bench_args))
            rows += report["rates"]
            out[layout] = {"goodput_rps": bench_goodput.goodput(rows, 0.9), "rates": rows, "layerwise": layerwise}
            if layout == "1p1d":
                out[layout]["backend"] = re.findall(r"kv_transfer auto -> (\w+)", c.log("prefill-0"))[:1]
            if report["rates"][-1]["slo_attainment"] < 0.2:
                break                                # past saturation: higher rates only fail more


def rescore(layouts: dict[str, list[dict]], args) -> dict:
    """The same runs scored at tighter TPOT SLOs: per SLO and layout, attainment per rate and goodput."""
    out = {}
    for tpot in (float(t) for t in args.rescore_tpot.split(",") if t.strip()):
        key = f"ttft<={args.slo_ttft:g}s,tpot<={1000 * tpot:g}ms"
        out[key] = {}
        for layout, rows in layouts.items():
            scored = [{"rate": r["rate"], "slo_attainment": bench_goodput.attainment_at(r, args.slo_ttft, tpot)}
                      for r in rows if "ttft_tpot_s" in r]
            out[key][layout] = {"goodput_rps": bench_goodput.goodput(scored, 0.9), "rates": scored}
            print(f"{key} {layout}: goodput {out[key][layout]['goodput_rps']}, attainment "
                  f"{[(r['rate'], r['slo_attainment']) for r in scored]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="goodput,ttft")
    ap.add_argument("--backends", default="cuda_ipc,cuda_ipc+layerwise,nccl,nccl+layerwise,zmq,zmq+layerwise",
                    help="ttft part: backends, NAME+layerwise for layer-wise streaming")
    ap.add_argument("--ttft-prompt-lens", default="2000,8000")
    ap.add_argument("--layerwise", action="store_true", help="goodput part: 1P1D with layer-wise streaming")
    ap.add_argument("--max-running", type=int, default=256)
    ap.add_argument("--layouts", default="1p1d,2 unified,1 unified")
    ap.add_argument("--rates", default="8,16,24,32")
    ap.add_argument("--seconds-per-rate", type=float, default=6.0)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--slo-ttft", type=float, default=1.0)
    ap.add_argument("--slo-tpot", type=float, default=0.05)
    ap.add_argument("--rescore-tpot", default="0.025,0.015,0.012",
                    help="goodput part: score the same runs again at these TPOT SLOs (s), TTFT SLO kept")
    ap.add_argument("--ttft-requests", type=int, default=5)
    ap.add_argument("--num-pages", type=int, default=8192)
    ap.add_argument("--heartbeat-s", type=float, default=1.5)
    ap.add_argument("--deadline-s", type=float, default=1e9, help="skip parts that start after this")
    args = ap.parse_args()
    args.ttft_lens = [int(n) for n in args.ttft_prompt_lens.split(",")]
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # a timeout's TERM stops the clusters too
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    result = {"ttft": {}, "goodput": {}, "args": vars(args)}
    path = os.path.join(args.out, "kv_gpu_study.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    for part in args.parts.split(","):
        names = args.layouts.split(",") if part == "goodput" else args.backends.split(",")
        for name in names:
            if time.monotonic() - start > args.deadline_s:
                result.setdefault("skipped", []).append(f"{part}:{name}")
                continue
            try:
                if part == "goodput":
                    goodput(args, name, result["goodput"], result["ttft"], start + args.deadline_s)
                else:
                    ttft_split(args, name, result["ttft"])
            except Exception as e:                   # one failed layout must not lose the others
                result.setdefault("failed", {})[f"{part}:{name}"] = f"{type(e).__name__}: {e}"[:2000]
                print(f"{part} {name} failed: {e}", flush=True)
            except KeyboardInterrupt:                # SIGINT/SIGTERM (a time limit): keep what we have
                result["interrupted"] = f"{part}:{name}"
                print(f"{part} {name} interrupted", flush=True)
                break
            save()
        if "interrupted" in result:
            break
    if result["goodput"]:
        title = (f"{os.path.basename(args.model_dir)}, {args.prompt_len}-token prompts, {args.max_tokens} out, "
                 f"SLO TTFT<={args.slo_ttft:g}s, TPOT<={1000 * args.slo_tpot:g}ms")
        layouts = {k: v["rates"] for k, v in result["goodput"].items() if isinstance(v, dict) and "rates" in v}
        bench_goodput.plot_attainment(layouts, args.out, title, 0.9)
        result["rescored"] = rescore(layouts, args)
    save()
    print(json.dumps({k: result[k] for k in result if k != "args"}, indent=1))


if __name__ == "__main__":
    main()
