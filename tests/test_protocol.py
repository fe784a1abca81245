"""Wire codec: every message round-trips, tensors are zero-copy and bit-exact (bad and malformed
input: test_protocol_hostile.py)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from cluster.wire import protocol as P
from cluster.wire.protocol import KvReq as kv_req, ProtocolError, TokensItem as tokens_item, decode, encode
from cluster.sampling_params import SamplingParams

SAMPLING = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop=["\n"],
                          stop_token_ids=[2], logprobs=True)


def kv(layers: int, seq_len: int, heads: int, head_dim: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, seq_len, heads, head_dim, generator=g).to(dtype)

NO_GAUGES = {d.name: None for d in P.WorkerGauges.declared()}

SIMPLE_MESSAGES = [
    P.Register("prefill-0", "prefill", "smollm2", {"num_pages": 2048, "page_size": 16,
                                                    "max_running_requests": 64, "tp": 1},
               {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "dtype": "bfloat16",
                "page_size": 16, "layout": "kv"}, "tcp://127.0.0.1:5555", 1234),
    P.Heartbeat("decode-0", 17, P.WorkerGauges(
        num_running_reqs=3, token_usage=0.25, kv_transfer_failures_total={"checksum": 1},
        kv_transfer_seconds=P.HistogramSample("kv_transfer_seconds", [0.1, 1.0], [1, 2, 0], 1.5, 3))),
    P.Generate("r1", [1, 2, 3], SAMPLING),
    P.Generate("r2", list(range(5000)), SAMPLING, peer=P.Peer("decode-0", "tcp://127.0.0.1:1"),
               model="m", dllm={"block_size": 8, "algorithm": "low_confidence", "threshold": 0.9},
               output_ids=[7, 8]),
    P.Reprefill("r3", [1, 2], SAMPLING, [7, 8, 9], P.Peer("decode-1", "tcp://127.0.0.1:2")),
    P.DecodeReady("r1", P.Peer("decode-0", "tcp://127.0.0.1:6000"), held_len=32),
    P.KvAck(["r1", "r2"], [P.KvFailed("r3", P.KvFailure.CHECKSUM, "KV checksum 0x1 != sent 0x2")], "decode-0"),
    P.Tokens("decode-0", [tokens_item("r1", [5, 6], None, None, [-0.5, -math.inf]),
                          tokens_item("r2", [], "stop", None), tokens_item("r3", [], None, "boom")]),
    P.Abort("r1", "client gone"),
    P.Shutdown("router shutting down"),
    P.RoleSwitch("decode"),
    P.Error("r1", "decode worker died", "decode-0"),
    P.Error("r2", "no kv_ack from decode-0 within 20s", "prefill-0", retriable=True),
    P.RequestMarks("prefill-0", [P.MarksItem("r1", [
        P.RequestMark("prefill_launched", 1764547200.25, {"forward_iter": 17}),
        P.RequestMark("prefill_done", 1764547200.5, {"forward_iter": 17, "to": "decode-0"})])]),
    P.FrontendSubmit(3, [P.FrontendRequest("a1", "m", "pd", [1, 2], SAMPLING, {}, 1764547200.5, None),
                         P.FrontendRequest("a2", "m", "pd", [1, 2], SAMPLING, {}, 1764547200.5, "00-ab-cd-01")]),
    P.FrontendEvents([P.FrontendEvent("a1", [5], None, [-0.5], [[[5, -0.5], [6, -1.5]]]),
                      P.FrontendEvent("a2", [], status=503, message="no worker", error_type="service_unavailable")],
                     ["a3", "a4"], [7, 8]),
    P.FrontendAbort("a1", "client disconnected"),
    P.FrontendEnd("a1", "success", "length"),
    P.FrontendQuery(4, "switch_role", {"worker_id": "decode-0", "role": "prefill"}),
    P.FrontendReply(4, 503, '{"error": {}}', retry_after=2),
    P.FrontendReport(17, 1.25, [P.MetricSample("pdcluster:requests_total", {"outcome": "success"}, 3.0)],
                     [[0.1, 0.02], [0.2, None]]),
    P.FrontendState(["smollm2-135m-instruct-dllm"]),
]


@pytest.mark.parametrize("msg", SIMPLE_MESSAGES, ids=lambda m: m.TYPE)
def test_every_message_type_round_trips(msg):
    frames = encode(msg)
    assert isinstance(frames[0], bytes)
    assert decode(frames) == msg
    assert decode([bytes(f) for f in frames]) == msg     # as received: plain bytes


def test_kv_ack_failure_reason_decodes_as_its_enum():
    [failed] = decode(encode(P.KvAck([], [P.KvFailed("r", "checksum", "bad")], "decode-0"))).failed
    assert failed.reason is P.KvFailure.CHECKSUM and str(failed) == "checksum: bad"
    with pytest.raises(ValueError):
        P.KvFailed("r", "checksum mismatch")


def test_every_type_is_covered():
    assert {m.TYPE for m in SIMPLE_MESSAGES} | {"kv_batch", "kv_layers"} == set(P._TYPES)


def test_request_marks_refuse_unknown_names_and_nested_attributes():
    for bad in (P.RequestMark("lunch", 1.0, {}), P.RequestMark("prefill_done", 1.0, {"x": [1, 2]}),
                P.RequestMark("prefill_done", float("nan"), {})):
        with pytest.raises(ProtocolError):
            decode(encode(P.RequestMarks("w", [P.MarksItem("r", [bad])])))


def test_long_input_ids_travel_as_int32_frame_and_come_back_as_list():
    short, long = P.Generate("a", [1] * P.INLINE_IDS, SAMPLING), P.Generate("b", list(range(1000)), SAMPLING)
    assert len(encode(short)) == 1
    frames = encode(long)
    assert len(frames) == 2 and len(frames[1]) == 4000
    got = decode(frames)
    assert got.input_ids == list(range(1000)) and type(got.input_ids[0]) is int


@pytest.mark.parametrize("forward_iter", [0, 17, 2**40])
def test_kv_batch_keeps_forward_iter(forward_iter):
    msg = P.KvBatch(forward_iter, "prefill-0", [kv_req("r", 1, 2)], [kv(1, 2, 1, 2)])
    assert decode(encode(msg)).forward_iter == forward_iter


def test_nested_items_decode_as_their_types():
    got = decode(encode(SIMPLE_MESSAGES[3]))
    assert isinstance(got.sampling, SamplingParams) and isinstance(got.peer, P.Peer)
    assert got.peer.worker_id == "decode-0" and got.sampling.seed == 3
    tokens = decode(encode(SIMPLE_MESSAGES[7]))
    assert all(isinstance(i, P.TokensItem) for i in tokens.items) and tokens.items[2].error == "boom"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("frame_bytes", [P.FRAME_BYTES, 1000, 7])
def test_kv_batch_tensors_bit_exact(dtype, frame_bytes):
    shapes = [(3, 7, 5, 11), (1, 1, 1, 3), (2, 13, 3, 9)]      # layers, seq_len, heads, dim
    tensors = [kv(l, n, h, d, dtype, seed=i) for i, (l, n, h, d) in enumerate(shapes)]
    reqs = [kv_req(f"r{i}", 10 + i, s[1], -0.1 * i if i else None) for i, s in enumerate(shapes)]
    msg = P.KvBatch(42, "prefill-0", reqs, tensors)
    frames = encode(msg, frame_bytes=frame_bytes)
    assert all(len(f) <= frame_bytes for f in frames[1:])
    assert len(frames) == 1 + sum(math.ceil(t.nbytes / frame_bytes) for t in tensors)
    got = decode([bytes(f) for f in frames])
    assert (got.forward_iter, got.prefill_worker_id, got.reqs) == (42, "prefill-0", reqs)
    for a, b in zip(tensors, (f.tensor() for f in got.tensors)):
        assert b.dtype == dtype and b.shape == a.shape and b.is_contiguous()
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_kv_layers_carry_one_layer_per_request_and_the_kv_batch_then_zero():
    spans = [P.KvSpan("a", 6, attempt=1), P.KvSpan("b", 9, held_len=4)]
    layer = [kv(1, 6, 2, 4, seed=1), kv(1, 5, 2, 4, seed=2)]
    got = decode([bytes(f) for f in encode(P.KvLayers(9, "prefill-0", 3, 1, spans, layer))])
    assert (got.forward_iter, got.layer, got.num_layers, got.reqs) == (9, 3, 1, spans)
    assert all(torch.equal(a, b.tensor()) for a, b in zip(layer, got.tensors))
    rest = decode(encode(P.KvBatch(9, "prefill-0", [kv_req("a", 1, 6, attempt=1, layers_sent=4)],
                                   [kv(0, 6, 2, 4)])))
    assert rest.reqs[0].layers_sent == 4 and rest.tensors[0].nbytes == 0
    in_place = P.KvLayers(9, "prefill-0", 0, 1, [P.KvSpan("a", 6, src_pages=[3, 1])], [], backend="cuda_ipc",
                          source={"handle": "ab", "shape": [2, 2]})
    assert decode(encode(in_place)) == in_place
    with pytest.raises(ProtocolError, match="2 layers, the message carries 1"):
        encode(P.KvLayers(9, "prefill-0", 0, 1, spans[:1], [kv(2, 6, 2, 4)]))
    with pytest.raises(ProtocolError, match="seq_len - held_len=5"):
        encode(P.KvLayers(9, "prefill-0", 0, 1, spans[1:], [kv(1, 9, 2, 4)]))
    with pytest.raises(ProtocolError, match="num_layers"):
        encode(P.KvLayers(9, "prefill-0", 0, 0, [], []))
    with pytest.raises(ProtocolError, match="held_len"):
        encode(P.KvLayers(9, "prefill-0", 0, 1, [{"rid": "a", "seq_len": 2, "attempt": 0,
                                                   "src_pages": None, "held_len": 2, "tp": 1,
                                                   "heads_per_rank": 0}], [], backend="shm"))


def test_default_split_is_4mib():
    t = kv(4, 1024, 8, 64)                                        # 16 MiB + 0 -> 4 frames
    frames = encode(P.KvBatch(1, "p", [kv_req("r", 1, 1024)], [t]))
    assert P.FRAME_BYTES == 4 << 20 and [len(f) for f in frames[1:]] == [4 << 20] * 4


def test_encode_is_zero_copy_and_decode_aliases_the_received_buffer():
    t = kv(2, 33, 2, 8)
    frames = encode(P.KvBatch(1, "p", [kv_req("r", 1, 33)], [t]))
    assert np.frombuffer(frames[1], np.uint8).ctypes.data == t.data_ptr()   # no copy on send
    received = [frames[0], bytearray(frames[1])]                            # writable, like zmq.Frame
    got = decode(received).tensors[0].tensor()
    assert got.data_ptr() == np.frombuffer(received[1], np.uint8).ctypes.data
    assert torch.equal(got, t)


def test_non_contiguous_tensor_is_sent_contiguous():
    base = kv(2, 6, 3, 4)
    t = base.transpose(3, 4).contiguous().transpose(3, 4)        # same values, other strides
    assert not t.is_contiguous()
    got = decode(encode(P.KvBatch(1, "p", [kv_req("r", 1, 6)], [t]))).tensors[0].tensor()
    assert torch.equal(got, base)


def test_plain_tokens_arrive_packed_and_read_as_items_after_the_others():
    msg = P.Tokens("unified-0", [P.TokensItem("a", [1], "stop")],
                   plain=P.PlainTokens(["b", "c"], [7, 8], forward_iter=5))
    got = P.decode(P.encode(msg))
    assert got.plain == msg.plain
    assert [(i.rid, i.token_ids, i.finish_reason, i.forward_iter) for i in got.all_items()] == [
        ("a", [1], "stop", None), ("b", [7], None, 5), ("c", [8], None, 5)]
    assert got.all_items() == msg.all_items()
    with pytest.raises(ValueError, match="2 rids for 1 tokens"):
        P.PlainTokens(["b", "c"], [7])


def test_role_switch_names_a_role_a_worker_may_switch_to():
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(P.RoleSwitch("dllm")))


def test_steady_tokens_take_their_own_path_with_the_generic_bytes_and_refusals():
    import msgpack
    for msg in [P.Tokens("w", [], plain=P.PlainTokens(["a.0"], [7], forward_iter=5)),
                P.Tokens("w", (), plain=P.PlainTokens(["a", "b"], [1, 2])),
                P.Tokens("w", [], plain=P.PlainTokens([], [], 3))]:
        body = {n: getattr(msg, n) for n in ("worker_id", "items", "plain")}
        generic = msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "tokens", **{
            k: P._plain(v) for k, v in P._check_body(P.Tokens, body).items()}}, use_bin_type=True)
        assert P.encode(msg) == [generic]
        assert P.decode([generic]) == P.Tokens("w", [], plain=P.PlainTokens(list(msg.plain.rids), msg.plain.token_ids,
                                                                             msg.plain.forward_iter))
    for bad, why in [(P.Tokens(5, [], plain=P.PlainTokens(["a"], [1])), "tokens.worker_id: expected str"),
                     (P.Tokens("w", None, plain=P.PlainTokens(["a"], [1])), "tokens.items: expected list"),
                     (P.Tokens("w", [], plain=P.PlainTokens(["a"], [True])), "tokens.plain.token_ids[0]: expected int")]:
        with pytest.raises(P.ProtocolError, match=re.escape(why)):
            P.encode(bad)
    head = {"v": P.PROTOCOL_VERSION, "type": "tokens", "worker_id": "w", "items": []}
    for plain, why in [({"rids": ["a"], "token_ids": [1, 2], "forward_iter": 1}, "tokens.plain: 1 rids for 2 tokens"),
                       ({"rids": ["a"], "token_ids": [1], "forward_iter": -1}, "tokens.plain.forward_iter: -1 is below 0"),
                       ({"rids": ["a"], "token_ids": [1]}, "tokens.plain: missing keys ['forward_iter']")]:
        with pytest.raises(P.ProtocolError, match=re.escape(why)):
            P.decode([msgpack.packb({**head, "plain": plain})])
