"""How fast the wire codec moves a KV tensor between two processes over loopback TCP.

    python benchmarks/codec_throughput.py [--mib 64] [--iters 12] [--repeats 3]

Rows (same bytes each: one bfloat16 KV tensor of --mib MiB in a `kv_batch`):
- split frames:  encode (4 MiB frames) -> PAIR send(copy=False) -> recv(copy=False) -> decode
- single frame:  the same with the whole tensor in one frame
- DataPlane:     the transport objects (I/O threads, queues) with the 4 MiB split
- zmq only:      the same frames received and dropped without decode (transfer alone)
- memcpy:        torch clone / numpy copy of the same bytes in one process (the ceiling)

The sender is a separate process; the receiver times from its "go" to the last decoded
message, so sending, receiving and decoding all count. Decoding a split tensor gathers
its frames into one buffer (one copy); a single frame is decoded in place (zero copy).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zmq  # noqa: E402

from cluster.wire.protocol import FRAME_BYTES, KvBatch, KvReq, decode, encode  # noqa: E402
from cluster.wire.transport import DataPlane  # noqa: E402

GB = 1e9


def kv_tensor(mib: int) -> torch.Tensor:
    layers, heads, head_dim = 32, 4, 64                        # bf16: 32 KiB per token
    prompt_len = mib * (1 << 20) // (layers * 2 * heads * head_dim * 2)
    g = torch.Generator().manual_seed(0)
    return torch.randn(layers, 2, prompt_len, heads, head_dim, generator=g).to(torch.bfloat16)


def kv_message(t: torch.Tensor) -> KvBatch:
    return KvBatch(1, "bench-tx", [KvReq("r0", 1, t.shape[2])], [t])


def sender(endpoint: str, mib: int) -> None:
    """Child process: on each command, send `n` kv_batch messages the asked way."""
    msg = kv_message(kv_tensor(mib))
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    ctl.connect(endpoint)
    while True:
        cmd, arg, n = ctl.recv_string().split()
        if cmd == "stop":
            break
        if cmd == "zmq":
            for _ in range(int(n)):
                ctl.send_multipart(encode(msg, frame_bytes=int(arg)), copy=False)
        elif cmd == "dataplane":
            with DataPlane("bench-tx") as plane:
                for _ in range(int(n)):
                    plane.send_to(arg, msg)
                ctl.recv_string()                              # wait until all arrived
    ctl.close(linger=0)
    ctx.term()


def run_zmq(ctl: zmq.Socket, frame_bytes: int, n: int, expect: torch.Tensor,
            decode_msgs: bool = True) -> float:
    ctl.send_string(f"zmq {frame_bytes} {n}")
    start = time.perf_counter()
    for i in range(n):
        frames = ctl.recv_multipart(copy=False)
        if decode_msgs:
            got = decode(frames).tensors[0]
            if i == 0:
                assert torch.equal(got.view(torch.int16), expect.view(torch.int16)), "not bit-exact"
    return n * expect.nbytes / (time.perf_counter() - start)


def run_dataplane(ctl: zmq.Socket, plane: DataPlane, n: int, expect: torch.Tensor) -> float:
    ctl.send_string(f"dataplane {plane.address} {n}")
    start = time.perf_counter()
    for i in range(n):
        item = plane.recv(60)
        assert item is not None, "dataplane timed out"
        if i == 0:
            assert torch.equal(item[1].tensors[0].view(torch.int16), expect.view(torch.int16))
    rate = n * expect.nbytes / (time.perf_counter() - start)
    ctl.send_string("done")
    return rate


def run_memcpy(t: torch.Tensor, n: int) -> tuple[float, float]:
    a = t.view(torch.uint8).numpy()
    times_t, times_n = [], []
    for _ in range(n):
        s = time.perf_counter(); t.clone(); times_t.append(time.perf_counter() - s)
        s = time.perf_counter(); a.copy(); times_n.append(time.perf_counter() - s)
    return t.nbytes / statistics.median(times_t), t.nbytes / statistics.median(times_n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=12, help="messages per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    args = ap.parse_args()
    expect = kv_tensor(args.mib)
    ctx = zmq.Context()
    ctl = ctx.socket(zmq.PAIR)
    ctl.setsockopt(zmq.LINGER, 0)
    ctl.bind("tcp://127.0.0.1:0")
    child = mp.get_context("spawn").Process(
        target=sender, args=(ctl.getsockopt_string(zmq.LAST_ENDPOINT), args.mib))
    child.start()
    plane = DataPlane("bench-rx")
    rows: dict[str, list[float]] = {"split": [], "single": [], "dataplane": [],
                                    "raw_split": [], "raw_single": []}
    try:
        run_zmq(ctl, FRAME_BYTES, 2, expect)                   # warm up connection + child
        for _ in range(args.repeats):                          # interleave to share noise
            rows["split"].append(run_zmq(ctl, FRAME_BYTES, args.iters, expect))
            rows["single"].append(run_zmq(ctl, expect.nbytes, args.iters, expect))
            rows["dataplane"].append(run_dataplane(ctl, plane, args.iters, expect))
            rows["raw_split"].append(run_zmq(ctl, FRAME_BYTES, args.iters, expect, False))
            rows["raw_single"].append(run_zmq(ctl, expect.nbytes, args.iters, expect, False))
        ctl.send_string("stop x 0")
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
        plane.close()
        ctl.close()
        ctx.term()
    clone, npcopy = run_memcpy(expect, 10)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"# {args.mib} MiB bf16 KV tensor, {args.iters} msgs x {args.repeats} runs (median), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    print(f"{'path':44s} {'GB/s':>7s} {'runs (GB/s)':>30s} {'vs split':>9s}")
    names = {"split": f"codec, {FRAME_BYTES >> 20} MiB frames (2 procs, TCP)",
             "single": f"codec, one {args.mib} MiB frame (2 procs, TCP)",
             "dataplane": f"DataPlane, {FRAME_BYTES >> 20} MiB frames (2 procs, TCP)",
             "raw_split": f"zmq only (no decode), {FRAME_BYTES >> 20} MiB frames",
             "raw_single": f"zmq only (no decode), one {args.mib} MiB frame"}
    for k, name in names.items():
        runs = " ".join(f"{r / GB:.2f}" for r in rows[k])
        print(f"{name:44s} {med[k] / GB:7.2f} {runs:>30s} {med[k] / med['split']:8.2f}x")
    for name, rate in (("memcpy: torch clone (1 proc)", clone), ("memcpy: numpy copy (1 proc)", npcopy)):
        print(f"{name:44s} {rate / GB:7.2f} {'':>30s} {rate / med['split']:8.2f}x")


if __name__ == "__main__":
    main()
