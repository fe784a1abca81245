"""KV page copies between two pools (`copy_pages`' paths) against a plain copy of the same bytes.

Paths, each timed on the same pages: `copy_runs` (one strided `Tensor.copy_` per run),
`gather_scatter` (index_select + index_copy_), `memcpy2d` (one `cudaMemcpy2DAsync` per run,
the copy engines), `copy_pages` (whatever the shipped policy picks), and `ceiling` (one
contiguous copy of the request's byte count). Layouts: `contiguous` (one run of pages) and
`scattered` (random pages of the pool on both sides: about one run per page). Scopes: `pool`
(one call for all layers) and `layer` (one call per layer slice `kv[l:l+1]`, as layer-wise
landing copies). Modes:
- `ipc`: two processes as in a cluster. A child owns the prefill pool on the second GPU
  (CUDA_VISIBLE_DEVICES with its GPU first, as the launcher sets it) and sends its
  `share_pool` description as one JSON line; this process, the decode side, maps it with
  `open_pool` and copies into its own pool on its first GPU.
- `peer`: one process, prefill pool on cuda:1, decode pool on cuda:0.
- `local`: both pools on one device (cuda:0, or the CPU).
Times: CUDA events on the decode device's stream (median of the reps), and wall time to
completion. One JSON line per measurement; all of them in --json. Finishes in < 60 s or
exits with what it has (a watchdog; the child's pipe reads time out).

    python3 benchmarks/page_copy_bench.py --device cuda --json /tmp/page_copy.json
    python3 benchmarks/page_copy_bench.py --device cpu --preset tiny-llama --tokens 512,2048
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import selectors
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"llama-3.1-8b": (32, 8, 128), "tiny-llama": (4, 2, 64)}   # layers, kv heads, head dim
HARD_LIMIT_S = 55.0            # the watchdog's exit; measuring stops 10 s before


def default_page_size() -> int:
    from cluster.config_types import SchedulerConfig
    return next(f.default for f in dataclasses.fields(SchedulerConfig) if f.name == "page_size")


def make_pool(args, device):
    import torch
    layers, heads, dim = SHAPES[args.preset]
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    kv = torch.empty((layers, 2, heads, args.num_pages, args.page_size, dim), dtype=dtype, device=device)
    if kv.is_cuda:
        kv.view(torch.int16).random_()              # random bits: a copy error cannot hide
    else:
        kv.normal_()
    return kv


def page_lists(args, tokens: int, layout: str, rng) -> tuple[list[int], list[int]]:
    n = -(-tokens // args.page_size)
    if layout == "contiguous":
        s, d = rng.randrange(args.num_pages - n + 1), rng.randrange(args.num_pages - n + 1)
        return list(range(s, s + n)), list(range(d, d + n))
    return rng.sample(range(args.num_pages), n), rng.sample(range(args.num_pages), n)


def path_fns(src, dst, src_pages, dst_pages, per_layer: bool):
    """path -> a callable doing the whole copy; per_layer: as layer-wise landing does, one
    `copy_pages`-style call per layer slice `kv[l:l+1]`."""
    from cluster.kv_transfer import page_copy as pc
    runs = pc.page_runs(src_pages, dst_pages)
    n_elems = src[:, :, :, :len(src_pages)].numel()
    src_flat, dst_flat = src.view(-1)[:n_elems], dst.view(-1)[:n_elems]
    slices = [(src[l:l + 1], dst[l:l + 1]) for l in range(src.shape[0])] if per_layer else [(src, dst)]

    def memcpy2d():
        for s, d in slices:
            if not pc.copy_runs_2d(s, d, runs):
                raise RuntimeError("the 2-D memcpy path is off (see the log)")

    each = lambda f: lambda: [f(s, d) for s, d in slices]  # noqa: E731
    fns = {"copy_runs": each(lambda s, d: pc.copy_runs_torch(s, d, runs)),
           "gather_scatter": each(lambda s, d: pc.gather_scatter(s, d, src_pages, dst_pages)),
           "memcpy2d": memcpy2d,
           "copy_pages": each(lambda s, d: pc.copy_pages(s, d, src_pages, dst_pages))}
    if not per_layer:
        fns["ceiling"] = lambda: dst_flat.copy_(src_flat, non_blocking=True)
    if not dst.is_cuda:
        del fns["memcpy2d"]
    return fns, len(runs), (src_flat, dst_flat)


def sync_all():
    import torch
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def time_fn(fn, dst, args) -> tuple[float, float]:
    """(median event ms on dst's stream, median wall ms to completion)."""
    import torch
    events, walls = [], []
    for i in range(args.warmup + args.reps):
        sync_all()
        t0 = time.perf_counter()
        if dst.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(dst.device))
        fn()
        if dst.is_cuda:
            end.record(torch.cuda.current_stream(dst.device))
        sync_all()
        wall = (time.perf_counter() - t0) * 1e3
        if i >= args.warmup:
            walls.append(wall)
            events.append(start.elapsed_time(end) if dst.is_cuda else wall)
    return statistics.median(events), statistics.median(walls)


def copied_exactly(path, fn, src, dst, src_pages, dst_pages, flats) -> bool:
    import torch
    bits = (lambda t: t.view(torch.int16)) if dst.is_cuda else (lambda t: t)
    if path == "ceiling":
        flats[1].zero_()
        fn()
        sync_all()
        return torch.equal(bits(flats[1]), bits(flats[0].to(dst.device)))
    idx = torch.tensor(dst_pages, device=dst.device)
    dst.index_fill_(3, idx, 0)
    fn()
    sync_all()
    expect = src.index_select(3, torch.tensor(src_pages, device=src.device)).to(dst.device)
    return torch.equal(bits(dst.index_select(3, idx)), bits(expect))


def measure(mode, src, dst, args, results, deadline):
    rng = random.Random(0)
    for layout in ("contiguous", "scattered"):
        for tokens in args.tokens_list:
            src_pages, dst_pages = page_lists(args, tokens, layout, rng)
            for scope in ("pool", "layer"):
                fns, num_runs, flats = path_fns(src, dst, src_pages, dst_pages, scope == "layer")
                nbytes = flats[0].numel() * flats[0].element_size()
                calls = src.shape[0] if scope == "layer" else 1
                for path, fn in fns.items():
                    if time.monotonic() > deadline:
                        print(json.dumps({"mode": mode, "skipped": "time budget spent"}), flush=True)
                        return
                    rec = {"mode": mode, "path": path, "scope": scope, "layout": layout, "tokens": tokens,
                           "runs": num_runs, "bytes": nbytes, "run_bytes": nbytes // (num_runs * calls)}
                    try:
                        ms, wall_ms = time_fn(fn, dst, args)
                        rec.update(ms=round(ms, 4), wall_ms=round(wall_ms, 4), GBps=round(nbytes / ms / 1e6, 1),
                                   ok=copied_exactly(path, fn, src, dst, src_pages, dst_pages, flats))
                    except RuntimeError as e:
                        rec.update(error=str(e)[:300])
                    results.append(rec)
                    print(json.dumps(rec), flush=True)


def child_main(args) -> None:
    """Prefill side: own the pool on this process' first GPU, publish it, wait to be released."""
    import torch
    from cluster.kv_transfer.cuda_ipc_backend import share_pool
    kv = make_pool(args, torch.device("cuda", 0))
    torch.cuda.synchronize()
    print(json.dumps(share_pool(kv)), flush=True)
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(timeout=HARD_LIMIT_S + 30)          # a line or EOF from the parent, or give up


def spawn_child(args) -> subprocess.Popen:
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(torch.cuda.device_count())))
    gpus = visible.split(",")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join([gpus[1], gpus[0]] + gpus[2:]))   # own GPU first
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--preset", args.preset,
           "--num-pages", str(args.num_pages), "--page-size", str(args.page_size)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout=max(timeout, 0.1)):
        raise TimeoutError(f"no IPC handle from the prefill child in {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the prefill child exited (rc {proc.wait(timeout=5)}) before sending its handle")
    return line


def suggest(results: list[dict]) -> dict:
    """For each scattered measurement, by bytes per run (per call): is the 2-D path faster than
    the better torch path (wall time, so that the per-call CPU cost counts)? (On 2 x H200 it
    never was past MAX_RUNS runs: page_copy.py sends those through gather/scatter.)"""
    out: dict = {}
    for mode in ("ipc", "peer", "local"):
        by: dict = {}
        for r in results:
            if r.get("mode") == mode and r.get("layout") == "scattered" and "wall_ms" in r:
                by.setdefault((r["scope"], r["tokens"], r["runs"], r["run_bytes"]), {})[r["path"]] = r["wall_ms"]
        rows = [{"scope": k[0], "tokens": k[1], "runs": k[2], "run_bytes": k[3],
                 "memcpy2d_ms": v["memcpy2d"], "torch_ms": min(v.get("copy_runs", 1e9), v.get("gather_scatter", 1e9)),
                 "memcpy2d_faster": v["memcpy2d"] < min(v.get("copy_runs", 1e9), v.get("gather_scatter", 1e9))}
                for k, v in sorted(by.items()) if "memcpy2d" in v]
        if rows:
            out[mode] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--num-pages", type=int, default=4096)
    ap.add_argument("--page-size", type=int, default=None, help="default: the engine's page_size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-ipc", action="store_true", help="skip the two-process mode")
    ap.add_argument("--json", default="", help="write all measurements here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t0 = time.monotonic()
    logging.basicConfig(level=logging.WARNING)       # the 2-D path says so when it turns itself off
    args.page_size = args.page_size or default_page_size()
    if args.child:
        return child_main(args)
    args.tokens_list = [int(t) for t in args.tokens.split(",")]
    need = max(-(-t // args.page_size) for t in args.tokens_list)
    if args.device == "cpu":
        args.num_pages = min(args.num_pages, 2 * need + 8)          # the CPU box is small
    if args.num_pages < need:
        ap.error(f"--num-pages {args.num_pages} cannot hold {max(args.tokens_list)} tokens")

    import torch
    deadline = t0 + HARD_LIMIT_S - 10
    child = None
    results: list[dict] = []
    info = {"torch": torch.__version__, "device": args.device, "preset": args.preset,
            "page_size": args.page_size, "num_pages": args.num_pages, "warmup": args.warmup, "reps": args.reps}

    def report():
        info["seconds"] = round(time.monotonic() - t0, 1)
        info["memcpy2d_vs_torch_scattered"] = suggest(results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"info": info, "results": list(results)}, f, indent=1)
        print(json.dumps({"info": info}), flush=True)

    def overrun():                # a copy or the child hangs: keep what was measured, exit
        info["error"] = "watchdog: over the time limit"
        if child is not None:
            child.kill()
        report()
        os._exit(3)

    watchdog = threading.Timer(max(HARD_LIMIT_S - (time.monotonic() - t0), 1.0), overrun)
    watchdog.daemon = True
    watchdog.start()
    try:
        if args.device == "cpu":
            dst = make_pool(args, "cpu")
            measure("local", make_pool(args, "cpu"), dst, args, results, deadline)
        else:
            if torch.cuda.device_count() < 2:
                raise SystemExit("needs two visible GPUs (--device cpu for a smoke test)")
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]
            child = None if args.no_ipc else spawn_child(args)
            d0, d1 = torch.device("cuda", 0), torch.device("cuda", 1)
            dst, peer_src, local_src = make_pool(args, d0), make_pool(args, d1), make_pool(args, d0)
            dst.view(-1)[:1].copy_(peer_src.view(-1)[:1])           # enables peer access
            sync_all()
            if child is not None:
                from cluster.kv_transfer.cuda_ipc_backend import open_pool
                try:
                    src = open_pool(json.loads(read_line(child, deadline - time.monotonic())), d0)
                    measure("ipc", src, dst, args, results, deadline)
                    del src
                except (TimeoutError, RuntimeError, ValueError) as e:
                    print(json.dumps({"mode": "ipc", "error": str(e)[:300]}), flush=True)
                    results.append({"mode": "ipc", "error": str(e)[:300]})
                sync_all()
                child.stdin.close()
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
            measure("peer", peer_src, dst, args, results, deadline)
            measure("local", local_src, dst, args, results, deadline)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        watchdog.cancel()
        report()


if __name__ == "__main__":
    main()
