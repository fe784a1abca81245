"""KV handoff across an emulated link: the multi-host cluster of tests/test_e2e_netns.py
(router + prefill-0 on host a, decode workers on hosts b and c, CURVE on) at several link
rates; per rate, the KV bandwidth prefill-0 measured (bytes / seconds from sending a
kv_batch to its kv_ack) against the configured rate, and the bytes the decode hosts'
interfaces received. Needs root (network namespaces).

    python benchmarks/netns_kv_link.py [--rates 100 200 500 1000] [--requests 3] [--curve on|off]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, now_utc  # noqa: E402
from tests.netns_hosts import netns_unavailable  # noqa: E402
from tests.test_e2e_netns import LONG_PROMPT, MultiHost  # noqa: E402


def measure(rate_mbit: int, num_requests: int, curve_mode: str) -> dict:
    cluster = MultiHost(rate_mbit, curve_mode)
    try:
        rates, sizes, rx_total = [], [], 0
        for i in range(num_requests):
            time.sleep(2.5)                           # the last heartbeat's gauges are in
            before = sum(cluster.hosts.counters(h)["rx_bytes"] for h in ("b", "c"))
            bytes0, seconds0 = cluster.kv_transfer()
            # a different first word each time: no prefix cache hit anywhere
            cluster.complete(f"{i} {LONG_PROMPT}", 1)
            time.sleep(2.5)
            total, total_s = cluster.kv_transfer()
            rx_total += sum(cluster.hosts.counters(h)["rx_bytes"] for h in ("b", "c")) - before
            sizes.append(total - bytes0)
            rates.append((total - bytes0) * 8 / (total_s - seconds0) / 1e6)
        return {"rate": rate_mbit, "shaping": cluster.hosts.shaping,
                "kv_mb": statistics.median(sizes) / 1e6, "kv_mbit": statistics.median(rates),
                "rx_over_kv": rx_total / sum(sizes)}
    finally:
        cluster.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[100, 200, 500, 1000])
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--curve", choices=["on", "off"], default="on",
                    help="CURVE on both planes (default on, as across real hosts)")
    args = ap.parse_args()
    reason = netns_unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    rows = []
    for rate in args.rates:
        rows.append(measure(rate, args.requests, args.curve))
        print(f"  {rows[-1]}", flush=True)
    print(f"\n{machine()}, {now_utc()}, link: {rows[0]['shaping']}, CURVE {args.curve}, "
          f"median of {args.requests} requests")
    print("| link (Mbit/s) | KV per request (MB) | KV bandwidth (Mbit/s) | of the link | bytes on the wire / KV bytes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['kv_mb']:.1f} | {r['kv_mbit']:.0f} | {r['kv_mbit'] / r['rate']:.0%} "
              f"| {r['rx_over_kv']:.3f} |")


if __name__ == "__main__":
    main()
