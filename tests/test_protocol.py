"""Wire codec: every message round-trips, tensors are zero-copy and bit-exact, and any
malformed input raises ProtocolError and nothing else."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_encode_refuses_bad_messages():
    with pytest.raises(ProtocolError, match="not a wire message"):
        encode(object())
    with pytest.raises(ProtocolError, match=r"generate.input_ids\[1\]"):
        encode(P.Generate("r", [1, -2], SAMPLING))
    with pytest.raises(ProtocolError, match="seq_len"):
        encode(P.KvBatch(1, "p", [kv_req("r", 1, 5)], [kv(1, 4, 1, 2)]))
    with pytest.raises(ProtocolError, match="top_p"):
        encode(P.Generate("r", [1], {**SAMPLING.to_wire(), "top_p": 2.0}))
    with pytest.raises(ProtocolError, match="dllm"):
        encode(P.Generate("r", [1], SAMPLING, dllm={"steps": [1, 2]}))
    with pytest.raises(ProtocolError, match="block_size"):
        encode(P.Generate("r", [1], SAMPLING, dllm={"block_size": 65}))
    with pytest.raises(ProtocolError, match="tensor"):
        encode(P.KvBatch(1, "p", [kv_req("r", 1, 1)], [torch.zeros(1, 2, 1, 1, 1, dtype=torch.complex64)]))


def _kv_frames():
    return [bytes(f) for f in encode(P.KvBatch(3, "p", [kv_req("r", 1, 4)], [kv(1, 4, 2, 3)]), frame_bytes=32)]


def _with_body(frames, **changes):
    body = msgpack.unpackb(frames[0])
    for k, v in changes.items():
        if v is KeyError:
            del body[k]
        else:
            body[k] = v
    return [msgpack.packb(body), *frames[1:]]


def _tensor_desc(**changes):
    frames = _kv_frames()
    desc = {**msgpack.unpackb(frames[0])["tensors"][0], **changes}
    return _with_body(frames, tensors=[desc])


BAD_INPUTS = {
    "no frames": [],
    "not msgpack": [b"\xc1"],
    "truncated body": [encode(P.Abort("r", "x"))[0][:-3]],
    "trailing bytes": [encode(P.Abort("r", "x"))[0] + b"\x00"],
    "body not a map": [msgpack.packb([1, "abort"])],
    "wrong version": _with_body([encode(P.Abort("r", "x"))[0]], v=2),
    "version is bool": _with_body([encode(P.Abort("r", "x"))[0]], v=True),
    "unknown type": _with_body([encode(P.Abort("r", "x"))[0]], type="pickle"),
    "missing key": _with_body([encode(P.Abort("r", "x"))[0]], reason=KeyError),
    "extra key": _with_body([encode(P.Abort("r", "x"))[0]], why="x"),
    "wrong type": _with_body([encode(P.Abort("r", "x"))[0]], rid=5),
    "bool as int": _with_body([encode(P.Heartbeat("w", 1, P.WorkerGauges()))[0]], forward_ct=True),
    "negative length": _with_body(_kv_frames(), reqs=[{"rid": "r", "first_token": 1, "seq_len": -4,
                                                       "first_logprob": None}]),
    "bin in body": _with_body([encode(P.Abort("r", "x"))[0]], reason=b"bytes"),
    "bad role": _with_body(encode(SIMPLE_MESSAGES[0]), role="leader"),
    "logprobs length": _with_body(encode(SIMPLE_MESSAGES[7]),
                                  items=[{"rid": "r", "token_ids": [1, 2], "finish_reason": None,
                                          "error": None, "logprobs": [0.0]}]),
    "sampling bound": _with_body(encode(SIMPLE_MESSAGES[2]), sampling={**SAMPLING.to_wire(), "max_tokens": 0}),
    "sampling missing field": _with_body(encode(SIMPLE_MESSAGES[2]), sampling={"max_tokens": 4}),
    "histogram counts": _with_body(encode(SIMPLE_MESSAGES[1]), gauges={**NO_GAUGES, "kv_transfer_seconds": {
        "name": "h", "bounds": [1.0], "counts": [1], "sum": 0.0, "count": 1}}),
    "kv_ack reason not declared": _with_body(encode(SIMPLE_MESSAGES[6]), failed=[
        {"rid": "r3", "reason": "checksum mismatch", "detail": ""}]),
    "undeclared gauge": _with_body(encode(SIMPLE_MESSAGES[1]), gauges={**NO_GAUGES, "num_runing_reqs": 1}),
    "labelled counter not a map": _with_body(encode(SIMPLE_MESSAGES[1]),
                                             gauges={**NO_GAUGES, "kv_transfer_failures_total": 3}),
    "missing tensor frame": _kv_frames()[:-1],
    "extra frame": _kv_frames() + [b"\x00" * 8],
    "byte count mismatch": _kv_frames()[:-1] + [_kv_frames()[-1] + b"\x00"],
    "frame out of range": _tensor_desc(frames=[1, 99]),
    "frame index zero": _tensor_desc(frames=[0, 2]),
    "dtype not allowed": _tensor_desc(dtype="object"),
    "shape vs bytes": _tensor_desc(shape=[1, 2, 4, 2, 4]),
    "kv shape vs seq_len": _tensor_desc(shape=[1, 2, 2, 4, 3]),
    "absurd shape": _tensor_desc(shape=[1 << 20, 2, 4, 1 << 20, 1 << 10]),
    "ids tensor wrong dtype": _with_body(encode(P.Generate("r", list(range(300)), SAMPLING)),
                                         input_ids={"dtype": "float32", "shape": [300], "frames": [1, 1]}),
    "ids tensor negative": [encode(P.Generate("r", list(range(300)), SAMPLING))[0],
                            np.full(300, -1, np.int32).tobytes()],
    "non-bytes frame": [12345],
}


@pytest.mark.parametrize("frames", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_malformed_input_raises_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


def test_error_names_the_field():
    frames = _with_body(encode(SIMPLE_MESSAGES[7]), items=[{"rid": "r", "token_ids": [1, "x"], "finish_reason": None,
                                                            "error": None, "logprobs": None}])
    with pytest.raises(ProtocolError, match=r"tokens\.items\.token_ids\[1\]|items\[0\]"):
        decode(frames)


# fuzzing -------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
VALID = [encode(m) for m in SIMPLE_MESSAGES] + [_kv_frames()]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_protocol_error(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_fuzz_random_bytes(frames):
    _decode_or_protocol_error(frames)


@FUZZ
@given(st.sampled_from(sorted(P._TYPES)), st.dictionaries(st.text(max_size=12), msgpack_values, max_size=8),
       st.lists(st.binary(max_size=16), max_size=3))
def test_fuzz_random_maps(type_name, fields, extra_frames):
    _decode_or_protocol_error([msgpack.packb({"v": 1, "type": type_name, **fields}), *extra_frames])


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated_valid_messages(frames, data):
    frames = [bytes(f) for f in frames]
    body = msgpack.unpackb(frames[0])
    key = data.draw(st.sampled_from(sorted(body)))
    body[key] = data.draw(msgpack_values)
    _decode_or_protocol_error([msgpack.packb(body), *frames[1:]])


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_truncated_and_dropped_frames(frames, data):
    frames = [bytes(f) for f in frames]
    i = data.draw(st.integers(0, len(frames) - 1))
    cut = data.draw(st.integers(0, max(0, len(frames[i]) - 1)))
    _decode_or_protocol_error(frames[:i] + [frames[i][:cut]] + frames[i + 1:])
    if len(frames) > 1:
        _decode_or_protocol_error(frames[:i] + frames[i + 1:] if i else frames[1:])


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
