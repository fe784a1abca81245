"""Chaos soak: a 2P2D cluster (CURVE on, KV fault switch) under streamed load for a while,
a random fault every few seconds (SIGKILL a prefill, SIGKILL a decode, SIGSTOP/SIGCONT a
decode), then the outcome table: requests in flight at each fault, seconds to recover,
and over the whole run completed-identical / failed-with-reason / hung / pages leaked.

    python benchmarks/chaos.py --duration 300 --fault-every 20 --concurrency 12

The short version of this runs in `make test` (tests/test_e2e_hardening.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.common import machine
from tests import test_e2e_hardening as h
from tests.cluster_harness import LaunchedCluster


def launch(kv_faults: str) -> LaunchedCluster:
    return h.launch_2p2d("chaos", kv_faults)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--fault-every", type=float, default=20)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--kv-faults", default=h.KV_FAULTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    c = launch(args.kv_faults)
    done, faults, running = [], [], [0]
    stop_at = time.monotonic() + args.duration
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while time.monotonic() < stop_at:
            with lock:
                running[0] += 1
            done.append(h.one_request(c, i))
            with lock:
                running[0] -= 1
            i += args.concurrency

    def recover(fault: dict, wid: str, old_pid: int) -> None:
        ok = h.wait_until(lambda: wid in h.worker_up(c) and (
            fault["fault"].startswith("SIGSTOP") or c.worker_pids().get(wid) not in (None, old_pid)),
            240, 0.2)
        fault["seconds_to_recover"] = round(time.monotonic() - fault["t"], 1) if ok else None

    try:
        pool = ThreadPoolExecutor(args.concurrency)
        clients = [pool.submit(client, k) for k in range(args.concurrency)]
        watchers = []
        while time.monotonic() < stop_at - args.fault_every:
            time.sleep(args.fault_every)
            pids = c.worker_pids()
            kind = rng.choice(["SIGKILL prefill", "SIGKILL decode", "SIGSTOP decode"])
            wid = rng.choice([w for w in pids if w.startswith(kind.split()[1])])
            fault = {"fault": f"{kind.split()[0]} {wid}", "in_flight": running[0]}
            if kind.startswith("SIGSTOP"):
                os.kill(pids[wid], signal.SIGSTOP)
                time.sleep(6)
                os.kill(pids[wid], signal.SIGCONT)
            else:
                os.kill(pids[wid], signal.SIGKILL)
            fault["t"] = time.monotonic()
            faults.append(fault)
            watchers.append(threading.Thread(target=recover, args=(fault, wid, pids[wid])))
            watchers[-1].start()
        for f in clients:
            f.result()
        for w in watchers:
            w.join(250)
        h.wait_until(lambda: not any(h.token_usage(c).values()), 60)
        ok = [d for d in done if d["error"] is None and d["text"] == c.reference[d["prompt"]]]
        out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "duration_s": args.duration, "kv_faults": args.kv_faults,
               "faults": [{k: v for k, v in f.items() if k != "t"} for f in faults],
               "num_requests": len(done), "completed_identical": len(ok),
               "failed_with_reason": sum(1 for d in done if d["error"] and not d.get("hung")),
               "hung": sum(1 for d in done if d.get("hung")),
               "wrong": sum(1 for d in done if d["error"] is None and d not in ok),
               "pages_leaked": sum(1 for v in h.token_usage(c).values() if v),
               "errors": sorted({d["error"][:120] for d in done if d["error"]})}
        print(json.dumps(out, indent=1))
    finally:
        c.stop()


if __name__ == "__main__":
    main()
