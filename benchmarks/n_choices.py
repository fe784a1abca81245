"""Cost of `n` choices through a real 1 prefill + 1 decode cluster: one request with `n` vs n=1.

Per request: wall time, the prompt tokens the prefill worker ran (`#new-token` of its
Prefill batch lines) and the KV bytes it shipped (`pdcluster:kv_transfer_bytes_total`).
The prompt is prefilled and shipped once for all n choices (decode forks them over its
KV), so both should stay at n = 1's; wall time grows only with the n decode streams.

    python benchmarks/n_choices.py                       # 512-token prompt, n = 1, 4
    python benchmarks/n_choices.py --write-md            # append to BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import disagg_config, machine, metric_values, now_utc  # noqa: E402
from tests.cluster_harness import LaunchedCluster  # noqa: E402

SECTION = "## n choices: one request with n vs n = 1 (one prefill, decode fork)"
NEW_TOKENS = re.compile(r"Prefill batch .*#new-token: (\d+),")
MODEL = "smollm2-135m-instruct"


def prefill_tokens(cluster) -> int:
    return sum(int(m.group(1)) for m in NEW_TOKENS.finditer(cluster.log("prefill-0")))


def kv_bytes(cluster) -> float:
    return sum(v for k, v in metric_values(cluster.metrics(), "pdcluster:kv_transfer_bytes_total").items()
               if "prefill" in k)        # the sender side only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--ns", default="1,4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write-md", action="store_true")
    args = ap.parse_args()
    # a fresh prompt per request: the prefix caches (prefill and decode side) must not serve it
    prompts = (list(range(1000 + k * (args.prompt_len + 7), 1000 + k * (args.prompt_len + 7) + args.prompt_len))
               for k in range(10_000))
    prompt = next(prompts)
    cluster = LaunchedCluster(disagg_config(), "n-choices")
    rows = []
    try:
        cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)   # warm-up
        for n in [int(x) for x in args.ns.split(",")]:
            walls, tokens, kvs = [], [], []
            for rep in range(args.reps):
                t_before, kv_before = prefill_tokens(cluster), kv_bytes(cluster)
                t0 = time.perf_counter()
                r = cluster.client.completions.create(model=MODEL, prompt=next(prompts), max_tokens=args.max_tokens,
                                                      n=n, temperature=1.0, seed=rep, extra_body={"ignore_eos": True})
                walls.append(time.perf_counter() - t0)
                assert len(r.choices) == n
                time.sleep(1.5)                # the heartbeat carries the KV byte counter
                tokens.append(prefill_tokens(cluster) - t_before)
                kvs.append(kv_bytes(cluster) - kv_before)
            rows.append({"n": n, "wall_s": median(walls), "prefill_tokens": median(tokens), "kv_mb": median(kvs) / 1e6})
            print(f"n={n}: {rows[-1]['wall_s']:.3f} s, prefill tokens {rows[-1]['prefill_tokens']:.0f}, "
                  f"KV shipped {rows[-1]['kv_mb']:.1f} MB", flush=True)
    finally:
        cluster.stop()
    if args.write_md:
        lines = [f"\n{SECTION}\n",
                 f"{now_utc()}, {machine()}. `python benchmarks/n_choices.py --prompt-len {args.prompt_len} "
                 f"--max-tokens {args.max_tokens} --ns {args.ns}`: one completions request, 1 prefill + 1 decode "
                 f"worker (configs/local.toml without dllm), medians of {args.reps}, both n in one run. One prefill and one KV transfer "
                 "for all n choices (decode forks them), so prefill work and KV shipped stay at n = 1's.\n",
                 "| n | wall (s) | prompt tokens prefilled | KV shipped (MB) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['n']} | {r['wall_s']:.3f} | {r['prefill_tokens']:.0f} | {r['kv_mb']:.1f} |" for r in rows]
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md"), "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
