"""Does the host keep up with the GPU? The engine alone against a unified cluster at hundreds of streams.

For each preset (dummy weights with Llama-3.2-1B / Llama-3.1-8B shapes and the vocabulary of the
tokenizer given, so the router detokenizes; bf16 on CUDA):
1. the engine alone: `ModelRunner.forward` decode steps at batch 1, 64 and 256 (CUDA graphs as the
   engine runs them, ids read back every step), at the context the cluster's streams average;
2. a unified cluster (`pdcluster launch`) serving `--streams` streamed completions of ~130-token
   prompts and `--max-tokens` output tokens each (ignore_eos) at concurrency `--streams`, through the
   OpenAI API, measured by `pdcluster bench`'s client: delivered tok/s, TPOT p50 (each stream's
   (e2e - TTFT) / (tokens - 1)), TTFT p50, ITL p50, streams cut (ended
   without their tokens: transport errors or error events), the worker's, router's, front ends' and
   the client's own CPU (`--client-procs N`: the client spread over N processes, client_procs.py),
   the worker's own decode tok/s at full batch (its log) and, from the router's traces, where the
   first tokens were (p50 of `generate` sent, prefill launched / done, the token at the router).
Writes host_path_gpu.json and host_path_gpu.md (a table) into --out.

    python benchmarks/host_path_gpu.py --tokenizer-json tokenizer.json --out OUT
    # CPU rehearsal with tiny sizes:
    python benchmarks/host_path_gpu.py --tokenizer-json tok.json --out /tmp/r --device cpu --dtype float32 \
        --presets tiny-llama --streams 8 --max-tokens 16 --batches 1,8
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.client_procs import closed_loop  # noqa: E402
from benchmarks.cluster_itl_gpu import stop_launcher, wait_ready, write_model_dir  # noqa: E402

PORT = 8123
PAGE_SIZE = 16
PROMPT_WORDS = 128                    # ~130 tokens with the default tokenizer


def num_pages_for(args) -> int:
    per_stream = -(-(PROMPT_WORDS * 2 + args.max_tokens + 16) // PAGE_SIZE)
    return per_stream * args.streams + 64


def engine_steps(model_dir: str, args) -> dict:
    """ms per decode step of the engine alone at each batch, at the streams' average context."""
    import torch
    from benchmarks.engine_gpu import bench_engine_decode
    from cluster.engine.loader import load_model
    from cluster.engine.model_runner import ModelRunner
    batches = [int(b) for b in args.batches.split(",")]
    if args.device == "cpu":   # the rehearsal: a second OpenMP thread on a busy 2-core VM is 20x slower
        torch.set_num_threads(1)
    loaded = load_model("dummy", path=model_dir, load_format="dummy", dtype=args.dtype, device=args.device)
    runner = ModelRunner(loaded, num_pages_for(args), PAGE_SIZE, args.device, args.dtype,
                         max_decode_batch=max(batches))
    context = 130 + args.max_tokens // 2
    ns = argparse.Namespace(decode_steps=args.engine_steps, device=args.device)
    out = {b: round(bench_engine_decode(runner, ns, b, context), 3) for b in batches}
    del runner, loaded
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"context": context, "ms_per_step": out}


LAYOUTS = ("unified", "1p1d")


def workers(layout: str, device: str) -> str:
    """The config's worker groups; on CUDA, 1p1d shares the one GPU between prefill and decode."""
    if layout == "unified":
        return "[[unified]]\ncount = 1\n"
    gpu = "gpus = [0]\nshare_gpus = true\n" if device.startswith("cuda") else ""
    return f"[[prefill]]\ncount = 1\n{gpu}\n[[decode]]\ncount = 1\n{gpu}"


def write_config(path: str, model_dir: str, args) -> None:
    with open(path, "w") as f:
        f.write(f'[model]\nname = "dummy"\npath = "{model_dir}"\nload_format = "dummy"\n'
                f'dtype = "{args.dtype}"\ndevice = "{args.device}"\n\n[router]\nport = {PORT}\n'
                f'max_queued_requests = {4 * args.streams}\n'
                + (f'api_servers = {args.api_servers}\n' if args.api_servers >= 0 else '') + '\n'
                f'[scheduler]\nnum_pages = {num_pages_for(args)}\nmax_running_requests = {args.streams}\n'
                f'page_size = {PAGE_SIZE}\n'
                + (f'max_prefill_tokens = {args.max_prefill_tokens}\n' if args.max_prefill_tokens else '')
                + '\n' + workers(args.layout, args.device))


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """utime + stime of the launcher and every process below it (workers run in their own sessions),
    by role: unified (the worker), router, launcher."""
    stats: dict[int, tuple[int, float, str]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        stats[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    out: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid not in stats:
            continue
        _, cpu, cmd = stats[pid]
        name = ("launcher" if pid == root else "unified" if "-m cluster.unified " in cmd else
                "frontend" if "-m cluster.router.frontend " in cmd else
                "router" if "-m cluster.router " in cmd else "prefill" if "-m prefill_worker " in cmd else
                "decode" if "-m decode_worker " in cmd else "other")
        out[name] = out.get(name, 0.0) + cpu
        todo += [p for p, (ppid, _, _) in stats.items() if ppid == pid]
    return out


def worker_decode_rate(log_dir: str, streams: int):
    """Median `gen throughput` of the decode worker's batch lines with >= 90 % of the streams running:
    what the worker itself generated per second at full batch, whatever the router and client did after."""
    import re
    rates = []
    for name in ("unified-0.log", "decode-0.log"):
        path = os.path.join(log_dir, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                rates += [float(r) for n, r in re.findall(r"Decode batch.*?#running-req: (\d+).*?gen throughput "
                                                          r"\(token/s\): ([\d.]+)", f.read()) if int(n) >= 0.9 * streams]
    return round(sorted(rates)[len(rates) // 2]) if rates else None


PHASE_ENDS = {"router_queue": "dispatched", "prefill_queue": "prefill_launched", "prefill_forward": "prefill_done"}


def first_token_phases(results: list[dict]) -> dict:
    """p50 over the streams of where each one's first token was, in ms from the router's arrival
    (`GET /debug/requests/{id}`): `generate` sent, prefill launched, prefill done, the first token at
    the router; beside the client's TTFT p50, what is left is the client's own send and read."""
    import urllib.request
    marks: dict[str, list[float]] = {m: [] for m in (*PHASE_ENDS.values(), "router_token")}
    for r in results:
        if "error" in r or not r.get("request_id"):
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/debug/requests/{r['request_id']}", timeout=5) as f:
                trace = json.loads(f.read())
        except (OSError, ValueError):
            continue
        for p in trace.get("phases", []):
            if p["phase"] in PHASE_ENDS and p["end_s"] is not None:
                marks[PHASE_ENDS[p["phase"]]].append(p["end_s"])
        if trace.get("tokens"):
            marks["router_token"].append(trace["tokens"][0]["t_s"])
    return {m: round(1e3 * sorted(v)[len(v) // 2], 1) if v else None for m, v in marks.items()}


def summary(results: list[dict], duration: float) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["num_tokens"] for r in ok)
    # TPOT as vLLM's bench: (e2e - ttft) / (tokens - 1); arrivals only count events that carry text
    tpot = sorted((r["e2e"] - r["ttft"]) / max(1, r["num_tokens"] - 1) for r in ok)
    itl = sorted(x for r in ok for x in r["itl"])
    arrivals = sum(len(r["arrivals"]) for r in ok)
    ms = lambda xs, q: round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None  # noqa: E731
    return {"streams": len(results), "streams_cut": len(results) - len(ok),
            "cut_errors": sorted({str(r["error"])[:120] for r in results if "error" in r})[:5],
            "delivered_tok_s": round(tokens / duration), "tpot_ms_p50": ms(tpot, 0.5),
            "ttft_ms_p50": ms(sorted(r["ttft"] for r in ok), 0.5), "itl_ms_p50": ms(itl, 0.5),
            "tokens_per_event": round(tokens / arrivals, 2) if arrivals else None,
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in ok) / len(ok), 1) if ok else None,
            "duration_s": round(duration, 2)}


def cluster_run(model_dir: str, out: str, args) -> dict:
    cfg = os.path.join(out, "unified.toml")
    write_config(cfg, model_dir, args)
    tree = os.path.abspath(args.cluster_tree or os.getcwd())   # another checkout: a before/after pair
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.launch.cli", "launch", cfg, "--log-dir",
                             os.path.join(out, "logs")], start_new_session=True, cwd=tree, env=env)
    try:
        wait_ready(proc, args.ready_s)
        req = dict(url=f"http://127.0.0.1:{PORT}/v1", model=None, prompt_len=PROMPT_WORDS, api_key="", json=True,
                   concurrency=args.streams)
        warm = argparse.Namespace(**req, num_requests=args.streams, max_tokens=4)   # kernels, graphs, connections
        closed_loop(warm, args.client_procs)
        start = {}

        def at_start():                                    # the clients are up: the window starts
            start.update(cpu0=tree_cpu_seconds(proc.pid), t0=time.perf_counter())
        results, duration, client_cpu = closed_loop(
            argparse.Namespace(**req, num_requests=args.streams, max_tokens=args.max_tokens), args.client_procs,
            at_start)
        cpu0, cpu1, wall = start["cpu0"], tree_cpu_seconds(proc.pid), time.perf_counter() - start["t0"]
        s = summary(results, duration)
        s["cpu_percent"] = {k: round(100 * (cpu1.get(k, 0) - cpu0.get(k, 0)) / wall) for k in cpu1}
        # the streaming client's own CPU (all its processes): near 100 % per process, the client limits the figures
        s["client_procs"], s["cpu_percent"]["client"] = args.client_procs, round(100 * client_cpu / wall)
        s["worker_decode_tok_s_p50"] = worker_decode_rate(os.path.join(out, "logs"), args.streams)
        s["first_token_ms_p50_from_router_arrival"] = first_token_phases(results)
        return s
    finally:
        stop_launcher(proc)


def table(report: dict, args) -> str:
    lines = [f"Streams: {args.streams} x {args.max_tokens} output tokens (ignore_eos), ~130-token prompts, "
             f"{args.device} {args.dtype}.", "",
             "| preset | engine ms/step (b=" + "/".join(args.batches.split(",")) + ") | engine tok/s at "
             f"b={args.streams} | cluster tok/s | ratio | TPOT p50 ms | TPOT / engine step | TTFT p50 ms | "
             "ITL p50 ms | tokens/event | streams cut | CPU % (worker or prefill / decode, router, front ends, "
             "client / its processes) | worker's own decode tok/s at full batch (its log, p50) |", "|" + "---|" * 13]
    for preset, r in report["presets"].items():
        eng, c = r.get("engine", {}), r.get("cluster", {})
        steps = eng.get("ms_per_step", {})
        step = steps.get(args.streams) or steps.get(str(args.streams))
        eng_tok_s = round(args.streams / step * 1e3) if step else None
        if "error" in c or not c:
            lines.append(f"| {preset} | {steps} | {eng_tok_s} | {c.get('error', 'not run')} |" + " |" * 9)
            continue
        ratio = round(c["delivered_tok_s"] / eng_tok_s, 2) if eng_tok_s else None
        tpot_ratio = round(c["tpot_ms_p50"] / step, 2) if step and c["tpot_ms_p50"] else None
        cpu = c.get("cpu_percent", {})
        worker_cpu = cpu["unified"] if "unified" in cpu else f"{cpu.get('prefill')} / {cpu.get('decode')}"
        lines.append(f"| {preset} | {' / '.join(str(v) for v in steps.values())} | {eng_tok_s} | "
                     f"{c['delivered_tok_s']} | {ratio} | {c['tpot_ms_p50']} | {tpot_ratio} | {c['ttft_ms_p50']} | "
                     f"{c['itl_ms_p50']} | {c['tokens_per_event']} | {c['streams_cut']} | "
                     f"{worker_cpu}, {cpu.get('router')}, {cpu.get('frontend', '-')}, "
                     f"{cpu.get('client')} / {c.get('client_procs', 1)} | {c.get('worker_decode_tok_s_p50')} |")
    for preset, r in report["presets"].items():
        phases = r.get("cluster", {}).get("first_token_ms_p50_from_router_arrival")
        if phases:
            lines.append(f"\n{preset}, the first token's way (p50, ms from the router's arrival): "
                         + ", ".join(f"{k} {v}" for k, v in phases.items())
                         + f"; the client's TTFT p50 {r['cluster']['ttft_ms_p50']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer-json")
    ap.add_argument("--out")
    ap.add_argument("--write-tokenizer", metavar="PATH", help="write the default model's tokenizer.json and exit")
    ap.add_argument("--presets", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,64,256", help="engine-alone decode batches (the last = --streams)")
    ap.add_argument("--engine-steps", type=int, default=32)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ready-s", type=float, default=240)
    ap.add_argument("--parts", default="engine,cluster", help="engine, cluster or both")
    ap.add_argument("--layout", choices=LAYOUTS, default="unified", help="the cluster's workers")
    ap.add_argument("--cluster-tree", help="serve the cluster from this checkout (default: this one)")
    ap.add_argument("--client-procs", type=int, default=1, help="spread the streaming client over N processes "
                    "(benchmarks/client_procs.py); 1: in this process, as before")
    ap.add_argument("--api-servers", type=int, default=-1, help="[router] api_servers (-1: the config's default)")
    ap.add_argument("--max-prefill-tokens", type=int, default=0, help="[scheduler] key (0: the config's default)")
    args = ap.parse_args()
    if args.write_tokenizer:   # on a machine with the default GGUF (the device has none)
        from cluster.engine.model_files import load_tokenizer
        os.makedirs(os.path.dirname(os.path.abspath(args.write_tokenizer)), exist_ok=True)
        with open(args.write_tokenizer, "w") as f:
            f.write(load_tokenizer().backend.to_str())
        return
    if not args.tokenizer_json or not args.out:
        ap.error("--tokenizer-json and --out are required")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # a timeout still stops the cluster (finally)
    os.makedirs(args.out, exist_ok=True)
    report = {"args": vars(args), "presets": {}}
    for preset in args.presets.split(","):
        out = os.path.join(args.out, preset)
        model_dir = os.path.abspath(os.path.join(out, "model"))
        write_model_dir(model_dir, args.tokenizer_json, preset)
        entry = report["presets"][preset] = {}
        t0 = time.perf_counter()
        parts = (("engine", engine_steps), ("cluster", lambda m, a: cluster_run(m, out, a)))
        for part, fn in (p for p in parts if p[0] in args.parts.split(",")):
            try:
                entry[part] = fn(model_dir, args)
            except Exception as e:   # one part failing still reports the others
                entry[part] = {"error": f"{type(e).__name__}: {e}"}
            print(preset, part, json.dumps(entry[part]), f"({time.perf_counter() - t0:.0f} s)", flush=True)
        with open(os.path.join(args.out, "host_path_gpu.json"), "w") as f:
            json.dump(report, f, indent=1)
    md = table(report, args)
    with open(os.path.join(args.out, "host_path_gpu.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
