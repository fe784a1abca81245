"""KV handoff bandwidth per transfer backend, against what the hardware moves.

Two processes, as in a cluster: a prefill side with a KV pool (random values, the model's
layout) and a decode side with its own pool; each handoff moves one request's KV from random
(scattered) prefill pages into random decode pages through the real backend and data plane:
pack, kv_batch over ZeroMQ, unpack (+ verify), import fence, kv_ack. Time = pack start to
kv_ack received, median of the reps, with verify on and off. Baselines, same bytes:
`zmq` vs a plain ZeroMQ send (4 MiB frames over loopback TCP), `shm` vs memcpy, `cuda_ipc` and
`nccl` vs a GPU0 -> GPU1 copy of one contiguous buffer and vs a copy within one GPU.

    python benchmarks/kv_transfer_bw.py --device cuda --preset llama-3.1-8b --backends zmq,cuda_ipc,nccl
    python benchmarks/kv_transfer_bw.py --device cpu --preset tiny-llama --backends zmq,shm --tokens 512,2048
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {"llama-3.1-8b": (32, 8, 128), "tiny-llama": (4, 2, 64)}   # layers, kv heads, head dim
PAGE = 16


def make_pool(args, shared: bool):
    import torch
    from cluster.engine.kv_cache import KVPool
    layers, heads, dim = SHAPES[args.preset]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    num_pages = max(args.tokens_list) // PAGE * 3 // 2 + 8
    storage = seg = None
    if shared:
        from cluster.kv_transfer.shm_backend import shared_pool_storage
        storage, seg = shared_pool_storage((layers, 2, heads, num_pages, PAGE, dim), dtype)
    pool = KVPool(layers, heads, dim, num_pages, PAGE, dtype, args.device, storage=storage)
    pool.kv.copy_(torch.randn(pool.kv.shape, device=args.device, dtype=torch.float32).to(dtype))
    return pool, seg


def pages_for(pool, tokens: int, rng, contiguous: bool = False) -> list[int]:
    """Random pages (a fragmented pool), or one run of consecutive pages (a fresh allocator)."""
    n = -(-tokens // PAGE)
    if contiguous:
        first = rng.randrange(pool.num_pages - n + 1)
        return list(range(first, first + n))
    return rng.sample(range(pool.num_pages), n)


def decode_side(args) -> None:
    import random
    from cluster.config import KvTransferConfig
    from cluster.kv_transfer import KvTransferError, TransferHub
    from cluster.wire import protocol as P
    from cluster.wire.transport import DataPlane
    pool, _ = make_pool(args, shared=False)
    rng = random.Random(1)
    with DataPlane("decode-0") as dp:
        hub = TransferHub(KvTransferConfig(verify=True), pool, "decode-0", data_addr=dp.address)
        print(dp.address, flush=True)
        while True:
            got = dp.recv(300)
            if got is None or isinstance(got[1], P.Shutdown):
                return
            sender, msg = got
            hub.verify = bool(msg.source.get("verify", 1))
            failed = []
            for item, payload in zip(msg.reqs, msg.tensors or [None] * len(msg.reqs)):
                try:
                    hub.receiver_for(msg.backend).unpack(sender, msg.source, item, payload, pages_for(
                        pool, item.transfer_len, rng, bool(msg.source.get("contiguous", 0))))
                except Exception as e:     # reported back, not fatal: the figure says it failed
                    reason = e.reason if isinstance(e, KvTransferError) else P.KvFailure.BACKEND
                    failed.append(P.KvFailed(item.rid, reason, f"{type(e).__name__}: {e}"))
            hub.fence.synchronize()
            refused = {f.rid for f in failed}
            dp.send_to(msg.source["reply_to"], P.KvAck([r.rid for r in msg.reqs if r.rid not in refused],
                                                       failed, "decode-0"))


def prefill_side(args, decode_addr: str) -> None:
    import random
    import torch
    from cluster.config import KvTransferConfig
    from cluster.kv_transfer import TransferHub
    from cluster.wire import protocol as P
    from cluster.wire.transport import DataPlane
    pool, seg = make_pool(args, shared="shm" in args.backend_list)
    rng = random.Random(0)
    rows = []
    with DataPlane("prefill-0") as dp:
        hub = TransferHub(KvTransferConfig(verify=True), pool, "prefill-0", segment=seg, data_addr=dp.address)
        for backend in args.backend_list:
            b = hub.sender(backend)
            for tokens, contiguous, verify in [(t, c, v) for t in args.tokens_list
                                               for c in args.placement_list for v in (True, False)]:
                if True:
                    b.verify = verify
                    times, errors = [], set()
                    for rep in range(args.warmup + args.reps):
                        pages = pages_for(pool, tokens, rng, contiguous)
                        t0 = time.perf_counter()
                        packed = b.pack(pages, tokens)
                        item = P.KvReq(f"r{rep}", 1, tokens, checksum=packed.checksum, src_pages=packed.src_pages)
                        source = {**b.source(), "reply_to": dp.address, "verify": int(verify),
                                  "contiguous": int(contiguous)}
                        dp.send_to(decode_addr, P.KvBatch(rep, "prefill-0", [item],
                                                          [packed.tensor] if backend == "zmq" else [],
                                                          backend=backend, source=source))
                        b.after_send(decode_addr, [packed])
                        got = dp.recv(300)
                        dt = time.perf_counter() - t0
                        if got is None:
                            raise SystemExit(f"{backend} {tokens}: no kv_ack")
                        errors |= {str(f) for f in got[1].failed}
                        if rep >= args.warmup:
                            times.append(dt)
                    nbytes = pool.request_bytes(tokens)
                    med = statistics.median(times)
                    rows.append({"backend": backend, "tokens": tokens, "verify": verify, "bytes": nbytes,
                                 "pages": "contiguous" if contiguous else "scattered",
                                 "handoff_ms": round(1000 * med, 3), "gb_per_s": round(nbytes / med / 1e9, 2),
                                 "errors": sorted(errors)[:2]})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        dp.send_to(decode_addr, P.Shutdown("done"))
        time.sleep(0.5)
    base = baselines(args, pool)
    print(json.dumps({"rows": rows, "baselines": base}), flush=True)


def _timed(fn, reps: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def baselines(args, pool) -> list[dict]:
    """GB/s of the same byte counts through the plain paths the backends are held against."""
    import torch
    import zmq
    out = []
    sync = (lambda: torch.cuda.synchronize()) if args.device == "cuda" else (lambda: None)
    for tokens in args.tokens_list:
        n = pool.request_bytes(tokens)
        src = torch.empty(n, dtype=torch.uint8, device=args.device)
        dst = torch.empty_like(src)
        t = _timed(lambda: dst.copy_(src), 5, sync)
        out.append({"path": f"copy within {args.device}", "tokens": tokens, "gb_per_s": round(n / t / 1e9, 2)})
        if args.device == "cuda" and torch.cuda.device_count() > 1:
            peer = torch.empty(n, dtype=torch.uint8, device="cuda:1")
            t = _timed(lambda: peer.copy_(src), 5, lambda: (torch.cuda.synchronize(0), torch.cuda.synchronize(1)))
            out.append({"path": "GPU0 -> GPU1 copy", "tokens": tokens, "gb_per_s": round(n / t / 1e9, 2)})
            del peer
        host = torch.empty(n, dtype=torch.uint8)
        ctx = zmq.Context.instance()
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        mv = memoryview(host.numpy())
        frames = [mv[i:i + (4 << 20)] for i in range(0, n, 4 << 20)]

        def send_recv():
            a.send_multipart(frames, copy=False)
            b.recv_multipart(copy=False)
        t = _timed(send_recv, 3, lambda: None)
        out.append({"path": "plain ZeroMQ send (one process, loopback TCP)", "tokens": tokens,
                    "gb_per_s": round(n / t / 1e9, 2)})
        a.close(0)
        b.close(0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", choices=sorted(SHAPES), default="llama-3.1-8b")
    ap.add_argument("--backends", default="zmq,cuda_ipc,nccl")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--placement", default="scattered,contiguous", help="pages: scattered, contiguous or both")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.backend_list = args.backends.split(",")
    args.tokens_list = [int(t) for t in args.tokens.split(",")]
    args.placement_list = [p == "contiguous" for p in args.placement.split(",")]
    if args.role == "decode":
        return decode_side(args)
    if args.role == "prefill":
        return prefill_side(args, args.peer)
    env = dict(os.environ)
    base = [sys.executable, os.path.abspath(__file__)] + sys.argv[1:]
    gpu = lambda order: {**env, "CUDA_VISIBLE_DEVICES": order} if args.device == "cuda" else env  # noqa: E731
    decode = subprocess.Popen(base + ["--role", "decode"], stdout=subprocess.PIPE, text=True, env=gpu("1,0"))
    try:
        addr = decode.stdout.readline().strip()
        prefill = subprocess.run(base + ["--role", "prefill", "--peer", addr], stdout=subprocess.PIPE,
                                 text=True, env=gpu("0,1"), timeout=500)
        if prefill.returncode:
            raise SystemExit(f"prefill side exited {prefill.returncode}")
        result = json.loads(prefill.stdout.strip().splitlines()[-1])
    finally:
        decode.kill()
    import torch
    result["machine"] = (torch.cuda.get_device_name(0) + " x2") if args.device == "cuda" else os.uname().nodename
    result["args"] = {k: getattr(args, k) for k in ("device", "preset", "backends", "tokens", "reps")}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
