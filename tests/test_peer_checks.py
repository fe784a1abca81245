"""Data-plane peers are held to the router's choice: a `decode_ready` from any decode
worker other than the one paired with the request does not release the user's KV to it;
a data-plane message whose body names another worker than its sender is dropped; per-worker
bookkeeping kept for tests stays bounded."""
from __future__ import annotations

import time

from cluster.config import KvTransferConfig
from cluster.engine.kv_cache import KVPool
from cluster.runtime.kv_handoff import KvHandoff
from cluster.runtime.schedule_batch import Req
from cluster.runtime.stats import MAX_REPORTED_ITERS, IterationStats, PrefillStats
from cluster.sampling_params import SamplingParams
from cluster.wire import protocol as P
from cluster.wire.messages import Peer
from prefill_worker.bootstrap_queue import BootstrapQueue

CHOSEN = Peer("decode-0", "tcp://127.0.0.1:5001")


def paired_req(rid: str) -> Req:
    req = Req(rid, [1, 2, 3], SamplingParams())
    req.peer = CHOSEN
    return req


def test_decode_ready_from_another_peer_does_not_release_the_request():
    q = BootstrapQueue(timeout_s=30)
    assert q.add(paired_req("r1")) is None
    assert q.mark_ready("r1", Peer("decode-9", "tcp://10.0.0.9:6000")) is None      # an impostor
    assert q.mark_ready("r1", Peer("decode-0", "tcp://10.0.0.9:6000")) is None      # right id, wrong address
    assert len(q) == 1
    req = q.mark_ready("r1", CHOSEN)
    assert req is not None and req.peer == CHOSEN and len(q) == 0


def test_early_ready_counts_only_from_the_chosen_peer():
    q = BootstrapQueue(timeout_s=30)
    q.mark_ready("r2", Peer("decode-9", "tcp://10.0.0.9:6000"))                    # before generate
    assert q.add(paired_req("r2")) is None                                   # still waiting
    assert q.mark_ready("r2", CHOSEN) is not None
    q.mark_ready("r3", CHOSEN)
    assert q.add(paired_req("r3")) is not None


def test_reported_iterations_are_bounded():
    stats = IterationStats(log_forward_iters=False, decode_log_interval=1)
    for it in range(1, 3 * MAX_REPORTED_ITERS):
        stats.report_prefill(it, PrefillStats(1, 4))
    assert len(stats.reported_iters) <= MAX_REPORTED_ITERS
    assert stats.reported_iters[-1] == ("prefill", 3 * MAX_REPORTED_ITERS - 1)


def test_a_data_plane_message_whose_body_names_another_sender_is_dropped_and_counted():
    kv, pool = KvTransferConfig(backend="zmq"), lambda: KVPool(2, 1, 4, 2, 4)
    prefill = KvHandoff.open("prefill-0", pool(), kv)
    decode = KvHandoff.open("decode-0", pool(), kv)
    try:
        decode.send_to(prefill.address, P.KvAck(["r1"], [], "decode-9"))          # claims another id
        decode.send_to(prefill.address, P.KvAck(["r2"], [], "decode-0"))
        got, deadline = [], time.monotonic() + 60     # a bound on a hang
        while len(got) < 1 and time.monotonic() < deadline:
            got += list(prefill.received())
            time.sleep(0.01)
        assert [(sender, msg.rids) for sender, msg in got] == [("decode-0", ["r2"])]
        assert prefill.rejected_frames == {"wrong_peer": 1}
    finally:
        prefill.close()
        decode.close()
