"""Where a disaggregated request's time to first token goes, and how fast its KV moves.

    python benchmarks/disagg_ttft.py [--lengths 512 2048] [--reps 3] [--max-tokens 4]
                                     [--threads N] [--skip-cluster] [--json FILE]

Two parts, same prompts (seeded random token ids of each length), same KV sizes:

1. Direct, in this process (SmolLM2-135M, float32, `--threads` torch threads = what a
   worker of a 1 prefill + 1 decode cluster gets on this host): the prefill forward, then
   the handoff stage by stage, export_kv -> protocol.encode -> DataPlane send -> decode
   (receiver's I/O thread) -> import_kv, and a plain ZeroMQ PAIR send of the same encoded
   frames over loopback TCP (no decode), which is the transfer ceiling.
2. A launched cluster (`pdcluster launch`, configs/local.toml without its dllm group,
   PDCLUSTER_LOG_LEVEL=DEBUG), one request at a time, streamed over the HTTP API:
     T0  client sends                       (client clock)
     TP  `Prefill batch [N]` line on prefill-0: after forward, export_kv, encode + enqueue
     TD  `kv_batch from prefill-0 [N]: <rid>` DEBUG line on decode-0: after decode + import_kv
     T1  client receives the first token    (client clock)
   Worker log times have millisecond resolution (same host clock as the client).
   Per request, /metrics `pdcluster:kv_transfer_seconds` (sum delta, read after the
   heartbeat) gives decode-0's decode_ready sent -> kv_batch popped, before import_kv (R), and prefill-0's
   kv_batch sent -> kv_ack received. The split (per request, then the median; the four
   parts add up to the TTFT exactly):
     queueing     = TD - import(direct) - R - T0: HTTP, router, dispatch, decode prealloc,
                    until decode-0 sends decode_ready                         (derived)
     prefill      = TP - export+encode(direct) - (T0 + queueing): bootstrap wait, schedule,
                    forward; a direct forward of the same prompt runs right after each
                    request (same machine load) to show how much of it is the forward
     KV transfer  = export+encode(direct) + TD - TP                            (derived;
                    cross-checked against the direct export..import total)
     first-token  = T1 - TD: commit, `tokens` message, detokenize, SSE        (observed)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402
import zmq  # noqa: E402

from benchmarks.common import (Cluster, disagg_config, log_time, machine, metric_values,  # noqa: E402
                               now_utc, stream_completion)
from cluster.runtime.batch_builder import build_forward_input  # noqa: E402
from cluster.runtime.cache_manager import CacheManager  # noqa: E402
from cluster.wire.protocol import KvBatch, KvReq, decode, encode  # noqa: E402
from cluster.sampling_params import SamplingParams  # noqa: E402
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch  # noqa: E402
from cluster.wire.transport import DataPlane  # noqa: E402

GB = 1e9
PAGE_SIZE = 16


def prompt_ids(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 40000, (length,), generator=g).tolist()


def ms(x: float) -> float:
    return round(1000 * x, 1)


# ---------------------------------------------------------------- 1. direct, in process

class DirectBench:
    """The model and one KV pool in this process; the DataPlanes and a plain PAIR socket pair."""

    def __init__(self, lengths: list[int], threads: int):
        from cluster.engine.loader import load_model
        from cluster.engine.model_runner import ModelRunner
        torch.set_num_threads(threads)
        num_pages = 2 * sum(-(-n // PAGE_SIZE) for n in lengths) + 8
        self.runner = ModelRunner(load_model(), num_pages=num_pages, page_size=PAGE_SIZE)
        self.cache = CacheManager(self.runner.page_allocator, PAGE_SIZE)
        self.tx, self.rx = DataPlane("bench-prefill"), DataPlane("bench-decode")
        self.ctx = zmq.Context()
        self.pull, self.push = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        self.pull.bind("tcp://127.0.0.1:0")
        self.push.connect(self.pull.getsockopt_string(zmq.LAST_ENDPOINT))
        self.src = {n: Req(f"src{n}", prompt_ids(n, n), SamplingParams(max_tokens=4, ignore_eos=True))
                    for n in lengths}
        self.dst = {n: Req(f"dst{n}", [1] * n, SamplingParams()) for n in lengths}
        for n in lengths:
            self.cache.grow(self.src[n], n)
            self.cache.grow(self.dst[n], n)

    def close(self) -> None:
        self.tx.close()
        self.rx.close()
        self.pull.close(linger=0)
        self.push.close(linger=0)
        self.ctx.term()

    def forward(self, length: int) -> float:
        fi = build_forward_input(ScheduleBatch([self.src[length]], ForwardMode.EXTEND, extend_lens=[length]))
        t0 = time.perf_counter()
        self.runner.forward(fi)
        return time.perf_counter() - t0

    def handoff(self, length: int, rep: int, check: bool = False) -> dict:
        """export -> DataPlane send_to (encodes) -> recv (decoded on the I/O thread) -> import,
        as the workers run it; then encode alone, plain zmq of the same frames, decode alone."""
        runner, src, dst = self.runner, self.src[length], self.dst[length]
        t1 = time.perf_counter()
        kv = runner.export_kv(src.page_table, length)
        t2 = time.perf_counter()
        self.tx.send_to(self.rx.address, KvBatch(rep, "bench-prefill", [KvReq(f"r{rep}", 1, length)], [kv]))
        got = self.rx.recv(60)
        t3 = time.perf_counter()
        assert got is not None, "DataPlane timed out"
        runner.import_kv(dst.page_table, got[1].tensors[0])
        t4 = time.perf_counter()
        msg = KvBatch(rep, "bench-prefill", [KvReq("r", 1, length)], [kv])
        t5 = time.perf_counter()
        frames = encode(msg)
        t6 = time.perf_counter()
        self.push.send_multipart(frames, copy=False)
        recvd = self.pull.recv_multipart(copy=False)
        t7 = time.perf_counter()
        decoded = decode(recvd).tensors[0]
        t8 = time.perf_counter()
        if check:
            assert torch.equal(decoded, kv) and torch.equal(runner.export_kv(dst.page_table, length), kv)
        return {"bytes": kv.numel() * kv.element_size(), "export": t2 - t1, "dataplane": t3 - t2,
                "import": t4 - t3, "handoff": t4 - t1, "encode": t6 - t5, "zmq_plain": t7 - t6,
                "decode": t8 - t7}


def measure_direct(bench: DirectBench, lengths: list[int], reps: int) -> dict:
    out = {}
    for length in lengths:
        bench.forward(length)
        bench.handoff(length, 0, check=True)            # warm-up: connections, allocator, bit-exact check
        samples = []
        for rep in range(1, reps + 1):
            fwd = bench.forward(length)
            h = bench.handoff(length, rep)
            samples.append({"forward": fwd, **h})
            print(f"  direct {length} tokens rep {rep}: forward {ms(fwd)} ms, handoff {ms(h['handoff'])} ms "
                  f"(export {ms(h['export'])}, send+recv {ms(h['dataplane'])}, import {ms(h['import'])}), "
                  f"plain zmq {ms(h['zmq_plain'])} ms", flush=True)
        num_bytes = samples[0]["bytes"]
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0] if k != "bytes"}
        out[length] = {"bytes": num_bytes, **{f"{k}_ms": ms(v) for k, v in med.items()},
                       "handoff_gbps": round(num_bytes / med["handoff"] / GB, 3),
                       "dataplane_gbps": round(num_bytes / med["dataplane"] / GB, 3),
                       "zmq_plain_gbps": round(num_bytes / med["zmq_plain"] / GB, 3)}
    return out


# ---------------------------------------------------------------- 2. launched cluster

def _kv_metrics(text: str) -> dict:
    """{worker: (seconds_sum, count, bytes_total)} from /metrics."""
    sums = metric_values(text, "pdcluster:kv_transfer_seconds_sum")
    counts = metric_values(text, "pdcluster:kv_transfer_seconds_count")
    num_bytes = metric_values(text, "pdcluster:kv_transfer_bytes_total")
    out = {}
    for labels, s in sums.items():
        worker = labels.split('worker="', 1)[1].split('"', 1)[0]
        out[worker] = (s, counts.get(labels, 0.0), num_bytes.get(labels, 0.0))
    return out


def _fresh_metrics(cluster: Cluster, want_count: float) -> dict:
    """Wait for the heartbeats (1 s) of both workers to carry `want_count` transfers each."""
    deadline = time.monotonic() + 10
    while True:
        m = _kv_metrics(cluster.metrics())
        counts = [m.get(w, (0, 0, 0))[1] for w in ("prefill-0", "decode-0")]
        if min(counts) >= want_count or time.monotonic() > deadline:
            return m
        time.sleep(0.3)


def find_prefill_line(log: str, after: float) -> tuple[float, str]:
    for line in log.splitlines():
        if " Prefill batch " in line and (t := log_time(line)) is not None and t >= after:
            return t, line
    raise RuntimeError("no Prefill batch line after the request was sent")


def find_kv_line(log: str, rid: str) -> tuple[float, str]:
    """The worker-side rid is the router's rid plus an attempt suffix (`<rid>.1`)."""
    pattern = re.compile(rf"kv_batch from \S+ \[\d+\]: {re.escape(rid)}(\.\d+)? kv_len=")
    for line in log.splitlines():
        if pattern.search(line):
            return log_time(line), line
    raise RuntimeError(f"no kv_batch DEBUG line for {rid} (is PDCLUSTER_LOG_LEVEL=DEBUG reaching decode-0?)")


async def _request(base_url: str, ids: list[int], max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0)) as client:
        return await stream_completion(client, ids, max_tokens)


def measure_cluster(bench: DirectBench, lengths: list[int], reps: int, max_tokens: int, direct: dict) -> dict:
    toml = disagg_config(scheduler={"num_pages": 1024, "max_prefill_tokens": max(4096, max(lengths))},
                         model={"max_model_len": max(4096, 2 * max(lengths))})
    out = {}
    with Cluster(toml, "disagg-ttft", env={"PDCLUSTER_LOG_LEVEL": "DEBUG"}) as cluster:
        for length in lengths:
            print(f"  warm-up request, {length} tokens", flush=True)
            asyncio.run(_request(cluster.base_url, prompt_ids(length, length + 1), max_tokens))
        num_done = len(lengths)
        before = _fresh_metrics(cluster, num_done)
        for length in lengths:
            ids = prompt_ids(length, length)               # the prompt the direct part measured
            exp_enc = (direct[length]["export_ms"] + direct[length]["encode_ms"]) / 1000
            imp = direct[length]["import_ms"] / 1000     # decode's clock (R) stops before import_kv
            rows = []
            for rep in range(reps):
                r = asyncio.run(_request(cluster.base_url, ids, max_tokens))
                num_done += 1
                after = _fresh_metrics(cluster, num_done)   # this request's transfer, per worker
                tp, pline = find_prefill_line(cluster.log("prefill-0"), r["t_send"])
                td, kline = find_kv_line(cluster.log("decode-0"), r["rid"])
                assert f"kv_len={length} " in kline and f"#new-token: {length}," in pline, (pline, kline)
                ready_to_kv = after["decode-0"][0] - before["decode-0"][0]     # decode_ready -> imported
                send_to_ack = after["prefill-0"][0] - before["prefill-0"][0]   # kv_batch sent -> kv_ack
                before = after
                fwd = bench.forward(length)                 # direct forward, interleaved with the cluster's
                t0, t1 = r["t_send"], r["arrivals"][0]
                tr = td - imp - ready_to_kv                 # when decode-0 sent decode_ready
                row = {"ttft": t1 - t0, "queueing": tr - t0,  # HTTP, router, dispatch, decode prealloc
                       "prefill": tp - exp_enc - tr,          # bootstrap wait + schedule + forward
                       "forward": fwd, "prefill_wait": tp - exp_enc - tr - fwd,
                       "kv_transfer": exp_enc + td - tp, "log_gap": td - tp, "first_token": t1 - td,
                       "send_to_ack": send_to_ack, "ready_to_kv": ready_to_kv}
                rows.append(row)
                print(f"  cluster {length} tokens rep {rep + 1}: TTFT {ms(row['ttft'])} ms; send -> decode_ready "
                      f"{ms(row['queueing'])}, decode_ready -> forward done {ms(row['prefill'])} "
                      f"(direct forward now {ms(fwd)}), prefill line -> kv_batch line {ms(td - tp)}, "
                      f"-> first token {ms(t1 - td)}", flush=True)
            out[length] = {k: ms(statistics.median(r[k] for r in rows)) for k in rows[0]}
            out[length]["rows"] = rows
    return out


# ---------------------------------------------------------------- report

def print_report(direct: dict, cluster: dict, args) -> None:
    print(f"\n{machine()}; torch {torch.__version__}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; "
          f"{now_utc()}; torch threads (direct part) {args.threads}")
    print("\nDirect, in process (median of %d):" % args.reps)
    print("| prompt | KV bytes | forward ms | export ms | encode ms | DataPlane send->decoded ms | "
          "decode ms | import ms | export..import ms | handoff GB/s | plain zmq ms | plain zmq GB/s | "
          "handoff / plain zmq |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, d in direct.items():
        print(f"| {n} | {d['bytes']:,} | {d['forward_ms']} | {d['export_ms']} | {d['encode_ms']} | "
              f"{d['dataplane_ms']} | {d['decode_ms']} | {d['import_ms']} | {d['handoff_ms']} | "
              f"{d['handoff_gbps']} | {d['zmq_plain_ms']} | {d['zmq_plain_gbps']} | "
              f"{d['handoff_gbps'] / d['zmq_plain_gbps']:.2f}x |")
    if not cluster:
        return
    print(f"\nLaunched cluster, 1 prefill + 1 decode, max_tokens {args.max_tokens} (median of {args.reps}; "
          "the four parts add up to TTFT per request):")
    print("| prompt | TTFT ms (observed) | queueing: send -> decode_ready ms (derived) | prefill: decode_ready "
          "-> forward done ms (derived) | KV transfer ms (derived) | first-token delivery ms (observed) | "
          "cluster KV GB/s |")
    print("|---|---|---|---|---|---|---|")
    for n, c in cluster.items():
        gbps = direct[n]["bytes"] / (c["kv_transfer"] / 1000) / GB
        print(f"| {n} | {c['ttft']} | {c['queueing']} | {c['prefill']} | {c['kv_transfer']} | "
              f"{c['first_token']} | {gbps:.2f} |")
    print("\nCross-checks (median): the direct forward run right after each request, the prefill-side wait "
          "it leaves (prefill - direct forward; noise-bound), the raw log gap, /metrics per request")
    print("| prompt | direct forward ms | prefill - direct forward ms | prefill line -> kv_batch line ms | "
          "direct export..import ms | /metrics prefill send->ack ms | /metrics decode ready->KV ms |")
    print("|---|---|---|---|---|---|---|")
    for n, c in cluster.items():
        print(f"| {n} | {c['forward']} | {c['prefill_wait']} | {c['log_gap']} | {direct[n]['handoff_ms']} | "
              f"{c['send_to_ack']} | {c['ready_to_kv']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="prompt lengths in tokens")
    ap.add_argument("--reps", type=int, default=3, help="measured repetitions per length (median)")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the direct part (default: cores / 2, as each worker of 1P+1D)")
    ap.add_argument("--skip-cluster", action="store_true", help="only the direct, in-process part")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // 2)
    print("[1/2] direct, in process: forward + export_kv + encode + send + decode + import_kv", flush=True)
    bench = DirectBench(args.lengths, args.threads)
    try:
        direct = measure_direct(bench, args.lengths, args.reps)
        cluster = {}
        if not args.skip_cluster:
            print("[2/2] launched cluster (1 prefill + 1 decode), sequential streamed requests", flush=True)
            cluster = measure_cluster(bench, args.lengths, args.reps, args.max_tokens, direct)
    finally:
        bench.close()
    print_report(direct, cluster, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "date": now_utc(), "args": vars(args),
                                               "direct": direct, "cluster": cluster}, indent=2))


if __name__ == "__main__":
    main()
