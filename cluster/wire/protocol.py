"""Wire messages between router and workers, and their msgpack codec.

Every message is a list of frames. Frame 0 is a msgpack map `{"v": 1, "type": T, ...}`
holding the message's fields; tensors (KV caches, long token-id lists) follow as extra
frames described in the body (see `tensor_frames.py`). There is one frozen dataclass per
message type and per nested item (defined in `messages.py`, re-exported here) and two
functions:

    encode(msg) -> list[bytes | memoryview]     # send with send_multipart(copy=False)
    decode(frames) -> Message                   # raises ProtocolError, nothing else

`decode` validates everything (version, type, exact key set, field types and ranges -
nested items and sampling parameters through their own types' `__post_init__` -
tensor dtype/shape/byte counts, frame indices, unused frames) so a bad frame is one
`ProtocolError` that the transport logs, counts and drops. `encode` runs the same checks,
so a message that encodes also decodes, and a sender's bug fails at the sender.
Pickle is never used.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import msgpack
import numpy as np

from cluster.config_types import KV_BACKENDS
from cluster.roles import ROLES, SWITCHABLE_ROLES
from cluster.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from cluster.dllm_params import MAX_BLOCK_SIZE, DllmParams
from cluster.wire.checks import (Bool, INT32_MAX, MAX_KEYS, MAX_ITEMS, MAX_STR, Check, Float, Int, List, Map,
                                Number, Opt, ProtocolError, Record, Scalar, Str, Strs, TokenIds, Typed,
                                fail)
from cluster.wire.frontend_messages import (FRONTEND_FIELDS, FrontendAbort, FrontendEnd, FrontendEvent,
                                            FrontendEvents, FrontendQuery, FrontendReply, FrontendReport,
                                            FrontendRequest, FrontendState, FrontendSubmit, MetricSample)
from cluster.wire.gauges import COUNTER, GAUGE, HISTOGRAM, WorkerGauges
from cluster.wire.messages import (Abort, DecodeReady, Error, Generate, Heartbeat, HistogramSample,
                                   KvAck, KvBatch, KvFailed, KvFailure, KvLayers, KvReq, KvSpan, MarksItem, Message,
                                   Peer, PlainTokens, Register, Reprefill,
                                   RequestMark, RequestMarks, RoleSwitch, Shutdown, Tokens, TokensItem,
                                   WORKER_MARKS)
from cluster.wire.steady_tokens import SteadyTokens
from cluster.wire.tensor_frames import (FRAME_BYTES, TENSOR_DESC, FramedTensor, TensorFrames, frame_buffer,
                                        framed_from_frames, tensor_from_frames)

__all__ = ["PROTOCOL_VERSION", "FRAME_BYTES", "ProtocolError", "Message", "encode", "decode",
           "Register", "Heartbeat", "Generate", "Reprefill", "DecodeReady", "KvBatch", "KvLayers", "KvAck",
           "Tokens", "Abort", "Error", "Shutdown", "RoleSwitch", "RequestMarks", "Peer", "KvReq", "KvSpan", "KvFailed", "KvFailure",
           "TokensItem", "PlainTokens", "HistogramSample", "WorkerGauges", "MarksItem", "RequestMark",
           "FrontendSubmit", "FrontendEvents", "FrontendAbort", "FrontendEnd", "FrontendQuery", "FrontendReply",
           "FrontendReport", "FrontendState", "FrontendRequest", "FrontendEvent", "MetricSample"]

PROTOCOL_VERSION = 1
INLINE_IDS = 256                 # longer token-id lists travel as an int32 frame
MAX_HEADER_BYTES = 64 << 20      # frame 0 (msgpack body)
MAX_FRAMES = 1 << 16


# field checks ------------------------------------------------------------------------

def _ids_or_tensor(v: Any, path: str) -> Any:
    if isinstance(v, dict):
        desc = TENSOR_DESC(v, path)
        if desc["dtype"] != "int32" or len(desc["shape"]) != 1:
            fail(path, f"token ids must be a 1-D int32 tensor, got {desc['dtype']}{desc['shape']}")
        return desc
    return TokenIds(min_len=1)(v, path)


def _dllm_overrides(v: Any, path: str) -> dict:
    """DLLM overrides: some of DllmParams' fields, bounded by DllmParams itself."""
    d = Map(Str(max_len=64), lambda x, p: x, max_len=16)(v, path)
    try:
        if d:                   # NOTE: building the defaults checks every field: not for each message
            DllmParams().with_overrides(d)
    except (TypeError, ValueError) as e:
        fail(path, str(e))
    return d


MAX_ID_LEN = 1024
ID, TEXT = Str(max_len=MAX_ID_LEN), Str()
_ids = Strs(MAX_ID_LEN, MAX_KEYS)                # request ids, one per row of a packed block
_PLAIN_FIELDS = {"rids": _ids, "token_ids": TokenIds(), "forward_iter": Opt(Int(lo=0))}   # a packed block of rows
MAX_SIBLINGS = 63                       # n > 1: choices forked from one prefill (the router's n is smaller)
SAMPLING = Typed(SamplingParams)        # its __post_init__ checks types and bounds
TOP = List(List(Number(), min_len=2, max_len=2), max_len=MAX_TOP_LOGPROBS)   # [[token_id, logprob], ...]
PROMPT_LPS = List(Float())                                                   # one per prompt token after the first
MAX_TP = 1024
PEER = Typed(Peer, {"worker_id": ID, "data_addr": TEXT, "tp": Int(lo=1, hi=MAX_TP)})

MAX_LAYERS = 1024
TP_LAYOUT = {"tp": Int(lo=1, hi=MAX_TP), "heads_per_rank": Int(lo=0, hi=INT32_MAX)}


def _source_value(v: Any, path: str) -> Any:
    """A kv_batch source entry: a scalar (IPC handles as hex text) or a short int list (shapes)."""
    if isinstance(v, list):
        return List(Int(), max_len=16)(v, path)
    if isinstance(v, str):
        return Str(max_len=4096)(v, path)
    if type(v) not in (int, float, bool):
        fail(path, f"expected str/int/float/bool/list of int, got {type(v).__name__}")
    return v


KV_SOURCE = Map(Str(max_len=64), _source_value, max_len=32)

HISTOGRAM_SAMPLE = Typed(HistogramSample, {
    "name": Str(max_len=256), "bounds": List(Float(finite=True), max_len=256),
    "counts": List(Int(lo=0), max_len=257), "sum": Float(), "count": Int(lo=0)})
_METRIC_CHECKS = {GAUGE: Number(), COUNTER: Number(), HISTOGRAM: HISTOGRAM_SAMPLE}
LABELED_COUNTS = Map(Str(max_len=64), Number(), max_len=64)          # {reason: n}
WORKER_GAUGES = Typed(WorkerGauges, {d.name: Opt(LABELED_COUNTS if d.label else _METRIC_CHECKS[d.kind])
                                     for d in WorkerGauges.declared()})

_FIELDS: dict[type, dict[str, Check]] = {
    Register: {"worker_id": ID, "role": Str(choices=ROLES), "model": TEXT,
               "capacity": Record({"num_pages": Int(lo=0), "page_size": Int(lo=1),
                                   "max_running_requests": Int(lo=0), "tp": Int(lo=1)}),
               "kv_fingerprint": Record({"num_layers": Int(lo=0), "num_kv_heads": Int(lo=0),
                                         "head_dim": Int(lo=0), "dtype": Str(max_len=64),
                                         "page_size": Int(lo=1), "layout": Str(max_len=64)}),
               "data_addr": TEXT, "pid": Int(lo=0)},
    Heartbeat: {"worker_id": ID, "forward_ct": Int(lo=0), "gauges": WORKER_GAUGES},
    Generate: {"rid": ID, "input_ids": _ids_or_tensor, "sampling": SAMPLING, "peer": Opt(PEER),
               "model": TEXT, "dllm": _dllm_overrides, "output_ids": TokenIds(),
               "siblings": List(ID, max_len=MAX_SIBLINGS)},
    Reprefill: {"rid": ID, "input_ids": TokenIds(min_len=1), "sampling": SAMPLING,
                "output_ids": TokenIds(), "decode": PEER},
    DecodeReady: {"rid": ID, "decode": PEER, "held_len": Int(lo=0), "dllm_attn_block": Int(lo=0, hi=MAX_BLOCK_SIZE)},
    KvBatch: {"forward_iter": Int(lo=0), "prefill_worker_id": ID,
              "reqs": List(Typed(KvReq, {"rid": ID, "first_token": Opt(Int(lo=0, hi=INT32_MAX)),
                                         "seq_len": Int(lo=1), "first_logprob": Opt(Float()),
                                         "first_top": Opt(TOP), "prompt_logprobs": Opt(PROMPT_LPS),
                                         "attempt": Int(lo=0, hi=INT32_MAX),
                                         "checksum": Opt(Int(lo=0, hi=(1 << 64) - 1)),
                                         "src_pages": Opt(List(Int(lo=0, hi=INT32_MAX))),
                                         "held_len": Int(lo=0, hi=INT32_MAX),
                                         "layers_sent": Int(lo=0, hi=MAX_LAYERS), **TP_LAYOUT}),
                           max_len=MAX_KEYS),
              "tensors": List(TENSOR_DESC, max_len=MAX_KEYS),
              "backend": Str(choices=KV_BACKENDS),
              "source": KV_SOURCE},
    KvLayers: {"forward_iter": Int(lo=0), "prefill_worker_id": ID,
               "layer": Int(lo=0, hi=MAX_LAYERS - 1), "num_layers": Int(lo=1, hi=MAX_LAYERS),
               "reqs": List(Typed(KvSpan, {"rid": ID, "seq_len": Int(lo=1),
                                           "attempt": Int(lo=0, hi=INT32_MAX),
                                           "src_pages": Opt(List(Int(lo=0, hi=INT32_MAX))),
                                           "held_len": Int(lo=0, hi=INT32_MAX), **TP_LAYOUT}),
                            max_len=MAX_KEYS),
               "tensors": List(TENSOR_DESC, max_len=MAX_KEYS),
               "backend": Str(choices=KV_BACKENDS),
               "source": KV_SOURCE},
    KvAck: {"rids": List(ID, max_len=MAX_KEYS),
            "failed": List(Typed(KvFailed, {"rid": ID, "reason": Str(choices=[r.value for r in KvFailure]),
                                            "detail": TEXT}), max_len=MAX_KEYS),
            "decode_worker_id": ID},
    Tokens: {"worker_id": ID,
             "items": List(Typed(TokensItem, {"rid": ID, "token_ids": TokenIds(),
                                              "finish_reason": Opt(TEXT), "error": Opt(TEXT),
                                              "logprobs": Opt(List(Float())),
                                              "top_logprobs": Opt(List(TOP, max_len=MAX_KEYS)),
                                              "forward_iter": Opt(Int(lo=0)),
                                              "prompt_logprobs": Opt(PROMPT_LPS)}),
                           max_len=MAX_KEYS),
             "plain": Opt(Typed(PlainTokens, _PLAIN_FIELDS))},
    RequestMarks: {"worker_id": ID, "items": List(Typed(MarksItem, {
        "rid": ID, "marks": List(Typed(RequestMark, {
            "name": Str(choices=WORKER_MARKS), "t": Float(finite=True),
            "attrs": Map(Str(max_len=64), Scalar(), max_len=32)}), max_len=len(WORKER_MARKS))}),
        max_len=MAX_KEYS)},
    Abort: {"rid": ID, "reason": TEXT},
    Error: {"rid": ID, "reason": TEXT, "worker_id": ID, "retriable": Bool()},
    Shutdown: {"reason": TEXT},
    RoleSwitch: {"role": Str(choices=SWITCHABLE_ROLES)},
}
_FIELDS.update(FRONTEND_FIELDS)                  # the router's own processes (api_servers > 1)
_TYPES: dict[str, type] = {cls.TYPE: cls for cls in _FIELDS}
_RECORDS: dict[type, Check] = {cls: Record(f) for cls, f in _FIELDS.items()}
_STEADY = SteadyTokens(PROTOCOL_VERSION, ID, _PLAIN_FIELDS)     # the per-step message, on its own path
for _cls, _f in _FIELDS.items():   # the schema and the dataclass must agree
    assert [x.name for x in dataclasses.fields(_cls)] == list(_f), _cls


def _check_body(cls: type, body: dict) -> dict:
    body = _RECORDS[cls](body, cls.TYPE)
    if cls in (KvBatch, KvLayers):
        _check_kv_tensors(cls.TYPE, body)
    return body


def _check_kv_tensors(name: str, body: dict) -> None:
    """One tensor per request with the zmq backend (none with the others, nor when decode ranks
    read their heads: a `source` naming `ranks`), each holding its request's positions
    [held_len, seq_len); kv_layers tensors hold exactly its layers. The receiver checks the rest
    of the shape against its own pool."""
    if body["tensors"] and len(body["reqs"]) != len(body["tensors"]):
        fail(name, f"{len(body['reqs'])} reqs but {len(body['tensors'])} tensors")
    pushes = body["backend"] == "zmq" and "ranks" not in body["source"]
    if pushes != bool(body["tensors"]) and body["reqs"]:
        fail(f"{name}.tensors", f"the {body['backend']} backend "
             f"{'sends' if pushes else 'sends no'} tensors{'' if pushes else ' here'}")
    if len({r.rid for r in body["reqs"]}) != len(body["reqs"]):
        fail(f"{name}.reqs", "duplicate rid")
    layers = body.get("num_layers")
    for i, (r, t) in enumerate(zip(body["reqs"], body["tensors"])):
        shape = t["shape"]
        if len(shape) != 5 or shape[1] not in (1, 2) or shape[2] != r.transfer_len:
            fail(f"{name}.tensors[{i}]", f"shape {shape} is not [layers, planes (K/V: 2, latent: 1), "
                 f"seq_len - held_len={r.transfer_len}, kv_heads, head_dim]")
        if layers is not None and shape[0] != layers:
            fail(f"{name}.tensors[{i}]", f"{shape[0]} layers, the message carries {layers}")


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}   # dataclass -> its field names (looked up once)


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


_AS_IS = frozenset({int, float, str, bool, bytes, type(None), dict, tuple})   # no dataclass inside (as before)


def _plain(v: Any) -> Any:
    """A checked field as msgpack takes it: nested frozen items become maps."""
    t = type(v)
    if t in _AS_IS:
        return v
    if t is list:
        return [_plain(x) for x in v] if v and dataclasses.is_dataclass(v[0]) else v
    if dataclasses.is_dataclass(v):
        return {name: _plain(getattr(v, name)) for name in _field_names(t)}
    return v


# codec -------------------------------------------------------------------------------

def encode(msg: Message, frame_bytes: int = FRAME_BYTES) -> list[Union[bytes, memoryview]]:
    """Frames of `msg`: msgpack body, then tensor frames of at most `frame_bytes` each.

    Tensor frames are memoryviews of the tensors' storage (zero copy): send them with
    `send_multipart(frames, copy=False)` and do not modify the tensors until sent.
    """
    cls = type(msg)
    if cls not in _FIELDS:
        raise ProtocolError(f"cannot encode {cls.__name__}: not a wire message")
    if SteadyTokens.is_steady(msg):
        return [_STEADY.encode(msg)]
    body = {name: getattr(msg, name) for name in _FIELDS[cls]}
    tensors = TensorFrames(frame_bytes)
    if cls is Generate and isinstance(body["input_ids"], (list, tuple)) and len(body["input_ids"]) > INLINE_IDS:
        ids = TokenIds(min_len=1)(body["input_ids"], "generate.input_ids")   # (a short list: by the record check)
        body["input_ids"] = tensors.add(np.asarray(ids, dtype=np.int32))   # numpy: the router has no torch
    elif cls in (KvBatch, KvLayers):
        import torch                     # only workers send KV
        if not isinstance(body["tensors"], (list, tuple)) or not all(
                isinstance(t, (torch.Tensor, FramedTensor)) for t in body["tensors"]):
            raise ProtocolError(f"{cls.TYPE}.tensors: expected a list of torch.Tensor")
        body["tensors"] = [tensors.add(t.tensor() if isinstance(t, FramedTensor) else t)
                           for t in body["tensors"]]
    body = {k: _plain(v) for k, v in _check_body(cls, body).items()}
    head = msgpack.packb({"v": PROTOCOL_VERSION, "type": cls.TYPE, **body}, use_bin_type=True)
    return [head, *tensors.frames]


def decode(frames: Sequence[Any]) -> Message:
    """Rebuild a message from received frames (zmq.Frame, bytes or memoryview).

    Raises ProtocolError, and only ProtocolError, for anything malformed.
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("a message needs at least one frame")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames exceed {MAX_FRAMES}")
    buffers = [frame_buffer(f) for f in frames]
    if len(buffers[0]) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame 0 of {len(buffers[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        # limits: frame 0's size is checked above (msgpack's max_buffer_size for a
        # one-shot unpack); strings, arrays and maps are bounded; no bin, no ext
        body = msgpack.unpackb(buffers[0], raw=False, strict_map_key=True, use_list=True,
                               max_str_len=MAX_STR, max_bin_len=0, max_ext_len=0,
                               max_array_len=MAX_ITEMS, max_map_len=MAX_KEYS)
    except Exception as e:  # msgpack raises several types (ValueError, ExtraData, OutOfData...)
        raise ProtocolError(f"frame 0 is not one msgpack object: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"frame 0 must be a map, got {type(body).__name__}")
    version, type_name = body.pop("v", None), body.pop("type", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version!r} (expected {PROTOCOL_VERSION})")
    cls = _TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(type_name)[:64]!r}")
    steady = _STEADY.decode(body) if cls is Tokens and len(buffers) == 1 else None
    if steady is not None:
        return steady
    body = _check_body(cls, body)
    used = [True] + [False] * (len(buffers) - 1)
    if cls is Generate and isinstance(body["input_ids"], dict):
        ids = tensor_from_frames(body["input_ids"], buffers, used, "generate.input_ids")
        if ids.numel() == 0 or int(ids.min()) < 0:
            raise ProtocolError("generate.input_ids: empty or negative token ids")
        body["input_ids"] = ids.tolist()
    elif cls in (KvBatch, KvLayers):
        # the frames stay unjoined: decode writes them straight into its reserved pages
        body["tensors"] = [framed_from_frames(d, buffers, used, f"{cls.TYPE}.tensors[{i}]")
                           for i, d in enumerate(body["tensors"])]
    if not all(used):
        unused = [i for i, u in enumerate(used) if not u]
        raise ProtocolError(f"{cls.TYPE}: frames {unused[:8]} are not referenced by the body")
    try:   # a message's own __post_init__ cross-checks its fields (lengths that must agree)
        return cls(**body)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{cls.TYPE}: {e}") from None
