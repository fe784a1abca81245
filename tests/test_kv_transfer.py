"""KV transfer backends against real KV pools: bytes land bit-exact in the reserved pages,
between two real processes (zmq over the data plane, shm through the prefill's segment), a
checksum catches corruption, `auto` picks as documented, and the fault switch parses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.config import KvTransferConfig
from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer import (KvFaults, KvFaultSpec, KvTransferError, TransferHub, choose_backend,
                                 is_same_host)
from cluster.kv_transfer.checksum import fold64, kv_checksum
from cluster.kv_transfer.page_copy import copy_pages, page_runs
from cluster.kv_transfer.shm_backend import shared_pool_storage
from cluster.wire import protocol as P
from cluster.wire.transport import DataPlane

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4)
T = 60.0


def filled_pool(num_pages: int, seed: int, storage=None) -> KVPool:
    pool = KVPool(num_pages=num_pages, storage=storage, **SHAPE)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def hand_off(hub_p: TransferHub, hub_d: TransferHub, src_pages, dst_pages, length, frame_bytes=P.FRAME_BYTES):
    """Pack on the prefill hub, encode/decode the kv_batch, unpack on the decode hub."""
    backend = hub_p.sender_for(hub_d.data_addr or "tcp://127.0.0.1:1")
    packed = backend.pack(src_pages, length)
    item = P.KvReq("r", 1, length, attempt=0, checksum=packed.checksum, src_pages=packed.src_pages)
    msg = P.KvBatch(3, "prefill-0", [item], [packed.tensor] if packed.tensor is not None else [],
                    backend=backend.name, source=backend.source())
    got = P.decode([bytes(f) for f in P.encode(msg, frame_bytes=frame_bytes)])
    payload = got.tensors[0] if got.tensors else None
    return hub_d.receiver_for(got.backend).unpack("prefill-0", got.source, got.reqs[0], payload, dst_pages)


@pytest.mark.parametrize("frame_bytes", [P.FRAME_BYTES, 1000, 24])   # rows cut by frame boundaries too
def test_zmq_writes_frames_straight_into_reserved_pages(frame_bytes):
    src, dst = filled_pool(16, seed=1), KVPool(num_pages=12, **SHAPE)
    src_pages, dst_pages, length = [3, 7, 8, 1], [9, 2, 3, 5], 14
    n = hand_off(TransferHub(KvTransferConfig("zmq"), src, "prefill-0"), TransferHub(KvTransferConfig("zmq"), dst, "decode-0"),
                 src_pages, dst_pages, length, frame_bytes)
    assert n == src.request_bytes(length)
    assert torch.equal(dst.export_kv(dst_pages, length), src.export_kv(src_pages, length))
    assert dst.kv[:, :, :, [0, 1, 4, 6]].abs().sum() == 0            # nothing outside the reserved pages


def test_shm_copies_pages_from_the_prefill_segment():
    storage, seg = shared_pool_storage((3, 2, 2, 16, 4, 8), torch.float32)
    src, dst = filled_pool(16, seed=2, storage=storage), KVPool(num_pages=8, **SHAPE)
    hub_p = TransferHub(KvTransferConfig("shm"), src, "prefill-0", segment=seg)
    hand_off(hub_p, TransferHub(KvTransferConfig("shm"), dst, "decode-0"), [5, 6, 7, 2], [0, 1, 2, 3], 13)
    assert torch.equal(dst.export_kv([0, 1, 2, 3], 13), src.export_kv([5, 6, 7, 2], 13))


def test_checksum_mismatch_is_caught_before_pages_go_live():
    src, dst = filled_pool(8, seed=3), KVPool(num_pages=8, **SHAPE)
    verified = KvTransferConfig("zmq", verify=True)
    hub_p, hub_d = TransferHub(verified, src, "prefill-0"), TransferHub(verified, dst, "decode-0")
    backend = hub_p.sender_for("tcp://127.0.0.1:1")
    packed = backend.pack([0, 1], 6)
    backend.corrupt(packed)
    msg = P.decode([bytes(f) for f in P.encode(P.KvBatch(
        1, "prefill-0", [P.KvReq("r", 1, 6, checksum=packed.checksum)], [packed.tensor]))])
    with pytest.raises(KvTransferError, match="checksum") as e:
        hub_d.receiver_for("zmq").unpack("prefill-0", {}, msg.reqs[0], msg.tensors[0], [4, 5])
    assert e.value.reason == "checksum" and dst.kv.abs().sum() == 0


def test_fixed_backend_refuses_another():
    hub = TransferHub(KvTransferConfig("shm"), KVPool(num_pages=2, **SHAPE), "decode-0")
    with pytest.raises(KvTransferError, match="takes 'shm'"):
        hub.receiver_for("zmq")


def test_every_wire_backend_has_a_sender_and_a_receiver_class():
    from cluster.config_types import KV_BACKENDS
    from cluster.kv_transfer.hub import BACKEND_CLASSES, RECEIVER, SENDER, backend_class
    assert tuple(BACKEND_CLASSES) == KV_BACKENDS
    for name in KV_BACKENDS:
        assert backend_class(name, SENDER).name == backend_class(name, RECEIVER).name == name
    with pytest.raises(ValueError, match="no KV transfer backend 'rdma'"):
        backend_class("rdma", SENDER)


def test_auto_picks_cuda_ipc_shm_or_zmq():
    assert choose_backend("cuda", same_host=True, has_shared_pool=False) == "cuda_ipc"
    assert choose_backend("cpu", same_host=True, has_shared_pool=True) == "shm"
    assert choose_backend("cpu", same_host=True, has_shared_pool=False) == "zmq"
    assert choose_backend("cuda", same_host=False, has_shared_pool=False) == "zmq"
    assert choose_backend("cpu", same_host=False, has_shared_pool=True) == "zmq"
    assert is_same_host("tcp://127.0.0.1:5000") and is_same_host("tcp://localhost:1")
    assert not is_same_host("tcp://203.0.113.9:5000")
    storage, seg = shared_pool_storage((3, 2, 2, 4, 4, 8), torch.float32)
    hub = TransferHub(KvTransferConfig("auto"), KVPool(num_pages=4, storage=storage, **SHAPE), "prefill-0", segment=seg)
    assert hub.sender_for("tcp://127.0.0.1:9").name == "shm"
    assert hub.sender_for("tcp://203.0.113.9:9").name == "zmq"
    hub.layerwise = "auto"                               # layer-wise only where bytes cross a socket
    assert [hub.streams_layers(hub.sender(n)) for n in ("zmq", "shm")] == [True, False]
    hub.layerwise = True
    assert hub.streams_layers(hub.sender("shm"))


def test_page_runs_coalesce_and_scattered_pages_copy_exactly():
    assert page_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    src = filled_pool(64, seed=4)
    dst = KVPool(num_pages=64, **SHAPE)
    src_pages = list(range(63, 0, -2))               # 32 runs of one page: the gather path
    dst_pages = list(range(32))
    copy_pages(src.kv, dst.kv, src_pages, dst_pages)
    assert torch.equal(dst.kv[:, :, :, :32], src.kv[:, :, :, src_pages])


def test_checksums_see_a_changed_or_moved_word():
    t = torch.randn(2, 2, 5, 3, 8)
    u = t.clone()
    u.view(-1)[7] += 1
    v = t.clone()
    v.view(-1)[[3, 4]] = t.view(-1)[[4, 3]]
    for fn in (fold64, kv_checksum):
        assert fn(t) == fn(t.clone()) and fn(t) != fn(u) and fn(t) != fn(v)
    assert 0 <= fold64(t) < 2 ** 64


def test_fault_switch_parses_and_draws_its_share():
    assert KvFaults.from_env({}) is None
    faults = KvFaults.from_env({"PDCLUSTER_TEST_KV_FAULT": "drop=0.25,corrupt=0.5,seed=3"})
    draws = [faults.draw() for _ in range(4000)]
    assert 0.2 < draws.count("drop") / 4000 < 0.3 and 0.45 < draws.count("corrupt") / 4000 < 0.55
    for bad in ("drop=2", "lose=0.1", "drop=x"):
        with pytest.raises(ValueError, match="PDCLUSTER_TEST_KV_FAULT"):
            KvFaultSpec.parse(bad)


PREFILL_CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from tests.test_kv_transfer import SHAPE, filled_pool
from cluster.config import KvTransferConfig
from cluster.kv_transfer import TransferHub
from cluster.kv_transfer.shm_backend import shared_pool_storage
from cluster.wire import protocol as P
from cluster.wire.transport import DataPlane
storage, seg = shared_pool_storage((3, 2, 2, 32, 4, 8), torch.float32)
pool = filled_pool(32, seed=11, storage=storage)
hub = TransferHub(KvTransferConfig(sys.argv[3]), pool, "prefill-0", segment=seg)
with DataPlane("prefill-0") as dp:
    print(dp.address, flush=True)
    backend = hub.sender_for(sys.argv[2])
    items, tensors = [], []
    for i, (pages, length) in enumerate([([4, 5, 6], 11), ([20, 9], 5)]):
        p = backend.pack(pages, length)
        items.append(P.KvReq(f"r{i}", 7, length, attempt=0, checksum=p.checksum, src_pages=p.src_pages))
        tensors += [p.tensor] if p.tensor is not None else []
    dp.send_to(sys.argv[2], P.KvBatch(5, "prefill-0", items, tensors, backend=backend.name,
                                      source=backend.source()))
    got = dp.recv(60)                       # the ack: only then may our pages (and we) go away
    print(json.dumps(got[1].rids), flush=True)
"""


@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_two_processes_hand_off_bit_exact(backend):
    dst = KVPool(num_pages=16, **SHAPE)
    hub = TransferHub(KvTransferConfig(backend), dst, "decode-0")
    expect = filled_pool(32, seed=11)
    with DataPlane("decode-0") as dp:
        hub.data_addr = dp.address
        child = subprocess.Popen([sys.executable, "-c", PREFILL_CHILD, str(REPO), dp.address, backend],
                                 env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
        try:
            got = dp.recv(T)
            assert got is not None, "no kv_batch from the prefill process"
            sender, msg = got
            assert (sender, msg.forward_iter, msg.backend) == ("prefill-0", 5, backend)
            dst_tables = [[1, 2, 3], [8, 0]]
            payloads = msg.tensors or [None] * len(msg.reqs)
            for item, payload, table in zip(msg.reqs, payloads, dst_tables):
                hub.receiver_for(msg.backend).unpack(sender, msg.source, item, payload, table)
            prefill_addr = child.stdout.readline().strip()
            dp.send_to(prefill_addr, P.KvAck([r.rid for r in msg.reqs], [], "decode-0"))
            assert json.loads(child.communicate(timeout=T)[0]) == ["r0", "r1"]
        finally:
            child.kill()
    assert torch.equal(dst.export_kv([1, 2, 3], 11), expect.export_kv([4, 5, 6], 11))
    assert torch.equal(dst.export_kv([8, 0], 5), expect.export_kv([20, 9], 5))


def test_in_place_page_checksum_ignores_placement_and_the_last_pages_tail():
    from cluster.kv_transfer.checksum import xxh3_pages
    src, dst = filled_pool(16, seed=5), filled_pool(16, seed=6)          # dst pages hold other junk
    copy_pages(src.kv, dst.kv, [3, 4, 9], [10, 2, 3])
    dst.kv[:, :, :, 3, 2:] = -7.0                                          # past the 10 tokens: not hashed
    assert xxh3_pages(src.kv, [3, 4, 9], 10) == xxh3_pages(dst.kv, [10, 2, 3], 10)
    dst.kv[1, 0, 1, 2, 3, 5] += 1                                          # a byte the request owns
    assert xxh3_pages(src.kv, [3, 4, 9], 10) != xxh3_pages(dst.kv, [10, 2, 3], 10)
