"""Transports: control and data plane exchange messages through I/O threads, bad frames are
counted and dropped, close() is prompt and frees the port, and a real two-process round
trip keeps forward_iter and KV tensors bit-exact."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from cluster.wire import protocol as P
from cluster.wire.protocol import KvReq as kv_req, encode
from cluster.sampling_params import SamplingParams
from cluster.wire.transport import ControlClient, ControlServer, DataPlane

REPO = Path(__file__).resolve().parents[1]
T = 10.0                                   # generous: the CI box is shared


@pytest.fixture
def server():
    s = ControlServer("tcp://127.0.0.1:0")
    yield s
    s.close()


@pytest.fixture
def raw_ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_control_server_and_client_exchange_in_order(server):
    with ControlClient(server.endpoint, "decode-0") as client:
        for i in range(50):
            client.send(P.Heartbeat("decode-0", i, P.WorkerGauges(num_running_reqs=i)))
        got = [server.recv(T) for _ in range(50)]
        assert [(w, m.forward_ct) for w, m in got] == [("decode-0", i) for i in range(50)]
        server.send("decode-0", P.Abort("r1", "client gone"))
        assert client.recv(T) == P.Abort("r1", "client gone")
        assert client.recv(0.05) is None


def test_sends_from_many_threads_all_arrive(server):
    with ControlClient(server.endpoint, "w") as client:
        def burst(k):
            for i in range(100):
                client.send(P.Abort(f"{k}-{i}", "x"))
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rids = {server.recv(T)[1].rid for _ in range(400)}
        assert len(rids) == 400


def test_client_queues_until_the_router_binds():
    probe = ControlServer("tcp://127.0.0.1:0")
    endpoint = probe.endpoint
    probe.close()
    with ControlClient(endpoint, "prefill-0") as client:
        client.send(P.Abort("r", "early"))
        time.sleep(0.2)
        with ControlServer(endpoint) as late:
            assert late.recv(T) == ("prefill-0", P.Abort("r", "early"))


@pytest.mark.parametrize("kind", ["control", "data"])
def test_garbage_frames_are_counted_and_the_socket_keeps_working(kind, raw_ctx):
    target = ControlServer() if kind == "control" else DataPlane("decode-0")
    address = target.endpoint if kind == "control" else target.address
    raw = raw_ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.IDENTITY, b"rogue")
    raw.connect(address)
    garbage = [[b"garbage"], [b"\x81\xa1v\x01"], [b""], [encode(P.Abort("r", "x"))[0], b"stray"]]
    try:
        for frames in garbage:
            raw.send_multipart(frames)
        raw.send_multipart(encode(P.Abort("ok", "after garbage")))
        assert target.recv(T) == ("rogue", P.Abort("ok", "after garbage"))
        assert target.num_protocol_errors == len(garbage)
    finally:
        raw.close(linger=0)
        target.close()


def test_send_to_unknown_worker_is_dropped_and_counted(server):
    server.send("nobody", P.Abort("r", "x"))
    with ControlClient(server.endpoint, "w") as client:
        client.send(P.Abort("r", "x"))
        assert server.recv(T) is not None
        assert server.num_send_errors == 1


def test_close_is_prompt_and_releases_the_port(raw_ctx):
    server = ControlServer("tcp://127.0.0.1:0")
    client = ControlClient(server.endpoint, "w")
    data = DataPlane("prefill-0")
    waiter = threading.Thread(target=server.recv, args=(None,))
    waiter.start()
    client.send(P.Abort("r", "x"))
    start = time.perf_counter()
    for obj in (client, server, data):
        obj.close()
        obj.close()                                             # idempotent
    waiter.join(2.0)
    assert time.perf_counter() - start < 1.5 and not waiter.is_alive()
    start = time.perf_counter()
    assert server.recv(None) is None and time.perf_counter() - start < 0.5   # no wait after close
    with pytest.raises(RuntimeError):
        client.send(P.Abort("r", "x"))
    with ControlServer(server.endpoint) as again:                # same port binds again
        assert again.endpoint == server.endpoint
    sock = raw_ctx.socket(zmq.ROUTER)
    sock.bind(data.address)
    sock.close(linger=0)


def test_recv_times_out(server):
    start = time.perf_counter()
    assert server.recv(0.2) is None
    assert 0.15 < time.perf_counter() - start < 2.0


def test_on_message_callback_replaces_the_queue():
    seen, done = [], threading.Event()
    with ControlServer(on_message=lambda item: (seen.append(item), done.set())) as server:
        with ControlClient(server.endpoint, "w") as client:
            client.send(P.Abort("r", "x"))
            assert done.wait(T)
            assert seen == [("w", P.Abort("r", "x"))] and server.recv(0.05) is None


def test_one_wake_up_event_fires_for_any_plane_a_worker_reads(server):
    arrivals = threading.Event()        # what an idle worker waits on (WorkerScheduler.recv_requests)
    with ControlClient(server.endpoint, "decode-0", arrivals=arrivals) as control, \
            DataPlane("decode-0", arrivals=arrivals) as data, DataPlane("prefill-0") as prefill:
        prefill.send_to(data.address, P.KvAck(["r1"], [], "prefill-0"))
        assert arrivals.wait(T) and data.recv(0)[1].rids == ["r1"]
        arrivals.clear()
        control.send(P.Abort("r2", "x"))                   # the router knows the client once it spoke
        assert server.recv(T) is not None
        server.send("decode-0", P.Abort("r3", "client gone"))
        assert arrivals.wait(T) and control.recv(0) == P.Abort("r3", "client gone")


def test_data_plane_moves_kv_batch_between_workers():
    with DataPlane("prefill-0") as prefill, DataPlane("decode-0") as decode:
        decode.send_to(prefill.address, P.DecodeReady("r1", P.Peer("decode-0", decode.address)))
        sender, ready = prefill.recv(T)
        assert (sender, ready.decode.data_addr) == ("decode-0", decode.address)
        tensors = [torch.randn(2, 2, 700, 4, 64).to(torch.bfloat16), torch.randn(2, 2, 3, 4, 64)]
        prefill.send_to(ready.decode.data_addr, P.KvBatch(
            9, "prefill-0", [kv_req("r1", 5, 700), kv_req("r2", 6, 3)], tensors))
        sender, kv = decode.recv(T)
        assert sender == "prefill-0" and kv.forward_iter == 9
        assert all(torch.equal(a, b.tensor()) for a, b in zip(tensors, kv.tensors))
        prefill.drop_peer(decode.address)
        decode.send_to(prefill.address, P.KvAck(["r1", "r2"], [], "decode-0"))
        assert prefill.recv(T)[1].rids == ["r1", "r2"]


CHILD = r"""
import os, sys, time
from cluster.wire.protocol import Abort, Register
from cluster.wire.transport import ControlClient, DataPlane
client, data = ControlClient(sys.argv[1], "decode-0"), DataPlane("decode-0")
client.send(Register("decode-0", "decode", "m", {"num_pages": 8, "page_size": 16,
                     "max_running_requests": 4, "tp": 1}, {"num_layers": 3, "num_kv_heads": 2,
                     "head_dim": 64, "dtype": "bfloat16", "page_size": 16, "layout": "kv"}, data.address, os.getpid()))
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    msg = client.recv(0.02)
    if isinstance(msg, Abort) and msg.rid == "stop":
        break
    if msg is not None:
        client.send(msg)                          # echo control messages
    item = data.recv(0.02)
    if item is not None:
        client.send(item[1])                      # echo data-plane messages over control
client.close(); data.close()
sys.exit(0 if client.num_protocol_errors == data.num_protocol_errors == 0 else 3)
"""


def test_two_process_round_trip_keeps_forward_iter_and_tensors_bit_exact(server):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, server.endpoint], cwd=REPO, env=env)
    try:
        worker, reg = server.recv(120)                          # the child imports torch
        assert (worker, reg.role) == ("decode-0", "decode")
        generate = P.Generate("a", [1, 2, 3], SamplingParams(seed=4, min_tokens=2),
                              peer=P.Peer("prefill-0", "tcp://127.0.0.1:1"), output_ids=[8])
        server.send("decode-0", generate)
        assert server.recv(T)[1] == generate

        tensors = [torch.randn(3, 2, 5000, 2, 64).to(torch.bfloat16),   # 7.3 MiB: 2 frames
                   torch.randn(3, 2, 7, 2, 64)]
        with DataPlane("prefill-0") as prefill:
            prefill.send_to(reg.data_addr, P.KvBatch(
                23, "prefill-0", [kv_req("a", 1, 5000, -0.25), kv_req("b", 2, 7)], tensors))
            _, kv = server.recv(T)
        assert kv.forward_iter == 23 and kv.reqs[0].first_logprob == -0.25
        for a, b in zip(tensors, (f.tensor() for f in kv.tensors)):
            assert b.dtype == a.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        server.send("decode-0", P.Abort("stop", "done"))
        assert child.wait(T) == 0
        assert server.num_protocol_errors == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(T)
