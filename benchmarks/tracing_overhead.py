"""Request tracing overhead on CPU: OTLP export on vs off, per request.

Two measurements in one run:
1. End to end: two 1 prefill + 1 decode clusters up at the same time, one with
   `[tracing] otlp_endpoint` pointing at an in-process OTLP/HTTP receiver, one without;
   `--requests` streamed greedy completions alternate between them (one at a time), so
   the machine's other load hits both alike. Per-request latency, mean and median.
2. The work tracing adds, timed in this process: a worker's marks for one request
   (MarkBook calls + encoding its `request_marks` messages) and the router's side (merging
   marks, assembling phases, observing the phase histogram, and, with OTLP on, building
   and handing over the spans).

    python benchmarks/tracing_overhead.py [--requests 40] [--max-tokens 8]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import Cluster, disagg_config, machine, now_utc, stream_completion  # noqa: E402


def end_to_end(args, endpoint: str) -> dict:
    base = disagg_config()
    configs = {"off": base, "on": base + f'\n[tracing]\notlp_endpoint = "{endpoint}"\n'}
    out = {k: [] for k in configs}
    clusters = {}
    try:
        for k, toml in configs.items():                           # each is up when built
            clusters[k] = Cluster(toml, f"tracing-{k}")

        async def run():
            clients = {k: httpx.AsyncClient(base_url=c.base_url, timeout=300) for k, c in clusters.items()}
            try:
                for k, client in clients.items():                 # warm-up
                    await stream_completion(client, "warm up", args.max_tokens)
                for i in range(args.requests):
                    order = ("off", "on") if i % 2 == 0 else ("on", "off")
                    for k in order:
                        r = await stream_completion(clients[k], f"Request {i}: count to ten:", args.max_tokens)
                        out[k].append(r["t_end"] - r["t_send"])
            finally:
                for client in clients.values():
                    await client.aclose()
        asyncio.run(run())
    finally:
        for c in clusters.values():
            c.stop()
    return out


def in_process(reps: int, endpoint: str) -> dict:
    from cluster.router.metrics import RouterMetrics
    from cluster.router.otlp_export import SpanExporter
    from cluster.router.tracing import RequestTracing
    from cluster.runtime.request_marks import MarkBook
    from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
    from cluster.sampling_params import SamplingParams
    from cluster.wire import protocol as P

    class Control:
        def __init__(self):
            self.sent = []

        def send(self, msg):
            self.sent.append(P.encode(msg))               # what a real send costs here

    def worker_side(i: int) -> list:
        ctl, book = Control(), MarkBook("w")
        req = Req(f"r{i}", [1, 2, 3, 4], SamplingParams(max_tokens=8))
        batch = ScheduleBatch(reqs=[req], mode=ForwardMode.EXTEND, extend_lens=[4], prefix_lens=[0],
                              is_last_chunk=[True], forward_iter=i)
        book.on_launch(batch)
        book.on_processing(batch)
        book.on_token(req)
        book.flush(ctl)
        batch = ScheduleBatch(reqs=[req], mode=ForwardMode.DECODE, forward_iter=i + 1)
        for step in range(8):
            book.on_launch(batch)
            book.on_processing(batch)
            book.flush(ctl)
        req.finish_reason = "length"
        book.on_release(req)
        book.flush(ctl)
        return [P.decode([f[0]]) for f in ctl.sent]

    msgs = [worker_side(i) for i in range(reps)]
    t0 = time.perf_counter()
    for i in range(reps):
        worker_side(i)
    worker_us = 1e6 * (time.perf_counter() - t0) / reps

    def router_side(tracing: RequestTracing, i: int) -> None:
        tr = tracing.begin(f"{i:032x}", "m", "pd", time.time())
        tr.mark("dispatched")
        for m in msgs[i]:
            for item in m.items:
                tr.merge_worker_marks({x.name: (x.t, x.attrs) for x in item.marks}, "w")
        for _ in range(8):
            tr.add_tokens(1)
        tracing.end(tr, "success", "length")

    metrics = RouterMetrics()
    result = {"worker_us": worker_us}
    for name, exporter in (("off", None), ("on", SpanExporter(endpoint))):
        tracing = RequestTracing("", metrics.observe_phase)
        tracing.spans = exporter
        t0 = time.perf_counter()
        for i in range(reps):
            router_side(tracing, i)
        result[f"router_{name}_us"] = 1e6 * (time.perf_counter() - t0) / reps
        tracing.close()
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40, help="per cluster")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2000, help="in-process repetitions")
    args = ap.parse_args()
    from tests.otlp_receiver import OtlpReceiver
    receiver = OtlpReceiver()
    try:
        print(f"# {now_utc()}; {machine()}", flush=True)
        costs = in_process(args.reps, receiver.endpoint)
        print(f"in process, per request: worker marks {costs['worker_us']:.1f} us; router "
              f"{costs['router_off_us']:.1f} us with OTLP off, {costs['router_on_us']:.1f} us on",
              flush=True)
        e2e = end_to_end(args, receiver.endpoint)
        for k in ("off", "on"):
            xs = e2e[k]
            print(f"end to end, OTLP {k}: {len(xs)} requests, mean {1000 * statistics.fmean(xs):.1f} ms, "
                  f"median {1000 * statistics.median(xs):.1f} ms", flush=True)
        d_mean = statistics.fmean(e2e["on"]) - statistics.fmean(e2e["off"])
        d_med = statistics.median(e2e["on"]) - statistics.median(e2e["off"])
        print(f"on - off: mean {1000 * d_mean:+.1f} ms, median {1000 * d_med:+.1f} ms per request; "
              f"spans received {len(receiver.spans)}")
    finally:
        receiver.close()
    print(f"# done {now_utc()}; {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
