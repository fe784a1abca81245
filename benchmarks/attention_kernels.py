"""One layer's decode attention on CUDA: the Triton paged kernel (default tuning and a sweep of
split count and tile size) against SDPA on contiguous KV (the yardstick's attention), with the
KV read rate each reaches, timed inside CUDA graphs. Pages are shuffled, as in a long-running pool.

    python benchmarks/attention_kernels.py --json out.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster.engine import triton_attention  # noqa: E402

SHAPES = {"8b": (32, 8, 128), "1b": (32, 8, 64)}   # heads, kv heads, head_dim


def ms(fn, reps: int = 20) -> float:
    """Kernel time: `reps` calls captured in one CUDA graph (as the engine runs them), so Python's launch
    cost does not count."""
    fn()
    if not torch.cuda.is_available():   # smoke runs (TRITON_INTERPRET=1 on a CPU)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--contexts", default="1024,256")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--sweep", default="1,2,4,8,16,32", help="split counts to try")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    ps, rows = args.page_size, []
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for (name, (h, kvh, d)), ctx, b in itertools.product(SHAPES.items(), map(int, args.contexts.split(",")),
                                                      map(int, args.batches.split(","))):
        per_req = -(-ctx // ps)
        num_pages = b * per_req + 1
        k = torch.randn(kvh, num_pages, ps, d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        pages = torch.randperm(num_pages, device=dev)[:b * per_req]
        starts = torch.arange(b, device=dev) * per_req
        lens = torch.full((b,), ctx, device=dev, dtype=torch.int64)
        q = torch.randn(b, h, d, device=dev, dtype=dtype)
        run = lambda **kw: triton_attention.decode(q, k, v, pages, starts, lens, d ** -0.5, **kw)  # noqa: E731
        default = ms(run)
        sweep = {f"s{s}_n{n}": ms(lambda: run(num_splits=s, block_n=n))
                 for s in map(int, args.sweep.split(",")) for n in (32, 64)}
        kc = torch.randn(b, kvh, ctx, d, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        qg = q.view(b, kvh, h // kvh, d)
        sdpa = ms(lambda: F.scaled_dot_product_attention(qg, kc, vc, scale=d ** -0.5))
        kv_bytes = 2 * b * ctx * kvh * d * 2
        best = min(sweep, key=sweep.get)
        row = {"shape": name, "batch": b, "context": ctx, "splits": triton_attention.num_decode_splits(b, kvh, q.device),
               "triton_ms": default, "best": best, "best_ms": sweep[best], "sdpa_contiguous_ms": sdpa,
               "triton_gb_s": kv_bytes / default / 1e6, "sdpa_gb_s": kv_bytes / sdpa / 1e6, "sweep": sweep}
        rows.append(row)
        print(json.dumps({k2: v2 for k2, v2 in row.items() if k2 != "sweep"}), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
