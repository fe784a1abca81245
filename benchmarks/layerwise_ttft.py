"""TTFT with layer-wise KV streaming off and on, side by side in one run (the default model).

    python benchmarks/layerwise_ttft.py [--backend zmq] [--words 200,800] [--reps 5]

Two 1 prefill + 1 decode clusters, identical but for `[kv_transfer] layerwise`, run at once;
requests go one at a time, alternating between them (same machine load for both), each a
prompt of N words streamed with 4 output tokens; the median client TTFT per cluster and
prompt length is printed as one markdown row.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import Cluster, machine, now_utc  # noqa: E402

from cluster.bench.client import cycled_prompt  # noqa: E402
from tests.cluster_harness import cluster_config  # noqa: E402

async def ttft(c: Cluster, prompt: str) -> float:
    import httpx
    from cluster.bench.client import one_request
    args = argparse.Namespace(model="smollm2-135m-instruct", max_tokens=4)
    async with httpx.AsyncClient(base_url=c.base_url + "/v1", timeout=300) as client:
        r = await one_request(client, args, prompt)
    if "error" in r:
        raise RuntimeError(r["error"])
    return r["ttft"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="zmq")
    ap.add_argument("--words", default="200,800")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    modes = {"off": False, "on": True}
    clusters = {m: Cluster(cluster_config("[[prefill]]\n[[decode]]\n", scheduler="max_prefill_tokens = 4096")
                           + f'\n[kv_transfer]\nbackend = "{args.backend}"\nlayerwise = {str(on).lower()}\n',
                           f"layerwise-{m}") for m, on in modes.items()}
    try:
        rows = []
        for n in [int(w) for w in args.words.split(",")]:
            got = {m: [] for m in modes}
            for i in range(args.reps + 1):                       # the first round warms up
                for m, c in clusters.items():
                    prompt = cycled_prompt(i, n)
                    t = asyncio.run(ttft(c, prompt))
                    if i:
                        got[m].append(t)
            off, on = (1000 * statistics.median(got[m]) for m in modes)
            rows.append(f"| {args.backend} | {n} words | {off:.1f} ms | {on:.1f} ms | {on / off:.2f} |")
            print(rows[-1], flush=True)
    finally:
        for c in clusters.values():
            c.stop()
    print(f"\n{machine()}, {now_utc()}, median of {args.reps}")
    print("| backend | prompt | TTFT p50, layerwise off | on | on / off |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
