"""Wire codec under bad input: encode refuses invalid messages, and any malformed or fuzzed input
raises ProtocolError, naming the field, and nothing else."""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.wire import protocol as P
from cluster.wire.protocol import KvReq as kv_req, ProtocolError, decode, encode
from tests.test_protocol import NO_GAUGES, SAMPLING, SIMPLE_MESSAGES, kv


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
