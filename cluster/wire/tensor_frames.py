"""Tensors as out-of-band multipart frames.

A tensor never enters the msgpack body. The body carries a descriptor
`{"dtype": "bfloat16", "shape": [..], "frames": [first, count]}` and the raw bytes
follow as `count` consecutive frames starting at index `first` (frame 0 is the body).
Bytes are split into frames of at most `FRAME_BYTES`: on these machines one 64 MiB
ZeroMQ frame moves at about half the rate of 1-4 MiB frames.

Zero copy, both ways:
- `TensorFrames.add` returns memoryviews of the tensor's own storage (after moving it to
  a contiguous CPU tensor if it is not one already); ZeroMQ sends them with copy=False.
  The caller must not modify the tensor until the message has left.
- `tensor_from_frames` rebuilds a single-frame tensor with `torch.frombuffer` on the
  received buffer itself (a writable zmq.Frame buffer). A tensor split over several
  frames is gathered into one fresh tensor: one copy, which the receiver would pay anyway
  to get contiguous memory. Read-only buffers (bytes) are copied too, since torch must not
  alias memory it cannot write.
- `framed_from_frames` checks the same things but gathers nothing: a `FramedTensor` keeps
  the received frames, so KV can be written from them straight into reserved pages.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from cluster.config_types import MODEL_DTYPES
from cluster.wire.checks import Int, List, Record, Str, fail

FRAME_BYTES = 4 << 20                   # max bytes per tensor frame
MAX_TENSOR_BYTES = 16 << 30             # absurd-size guard
MAX_NDIM = 8

# dtype allow-list, by name on the wire (no bool: arbitrary bytes are not valid bools); torch
# dtypes in `torch_dtypes.py`, imported where a tensor is built or sent (torch loads only there)
WIRE_DTYPES = MODEL_DTYPES + ("float64", "float8_e4m3fn", "float8_e5m2", "int64", "int32", "int16", "int8", "uint8")
NUMPY_DTYPES = ("float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8")
ITEM_BYTES = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2,
              "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}

TENSOR_DESC = Record({
    "dtype": Str(choices=WIRE_DTYPES),
    "shape": List(Int(lo=0, hi=MAX_TENSOR_BYTES), max_len=MAX_NDIM),
    "frames": List(Int(lo=0), min_len=2, max_len=2),
})


class TensorFrames:
    """Collects the out-of-band frames of one message while its body is built."""

    def __init__(self, frame_bytes: int = FRAME_BYTES):
        assert frame_bytes > 0
        self.frame_bytes = frame_bytes
        self.frames: list[memoryview] = []

    def add(self, t: "torch.Tensor | np.ndarray") -> dict:
        """Append `t`'s bytes as frames; return its descriptor for the body."""
        if isinstance(t, np.ndarray):
            if t.dtype.name not in NUMPY_DTYPES:
                fail("tensor", f"dtype {t.dtype} is not allowed on the wire")
            name, t = t.dtype.name, np.ascontiguousarray(t)
            raw = memoryview(t.reshape(-1).view(np.uint8))             # keeps t alive
        else:
            import torch
            name = str(t.dtype).removeprefix("torch.")
            if name not in WIRE_DTYPES:
                fail("tensor", f"dtype {t.dtype} is not allowed on the wire")
            t = t.detach().cpu().contiguous()
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # keeps t alive
        first = len(self.frames) + 1
        step = self.frame_bytes
        self.frames.extend(raw[i:i + step] for i in range(0, len(raw), step))
        return {"dtype": name, "shape": list(t.shape), "frames": [first, len(self.frames) + 1 - first]}


def frame_buffer(frame: Any) -> memoryview:
    """A memoryview over a received frame: zmq.Frame, bytes, bytearray or memoryview."""
    buf = getattr(frame, "buffer", frame)      # zmq.Frame exposes .buffer
    try:
        mv = memoryview(buf)
    except TypeError:
        fail("frame", f"expected a bytes-like frame, got {type(frame).__name__}")
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


class FramedTensor:
    """A received tensor still in its frames: `chunks` hold its bytes in order, unjoined."""
    __slots__ = ("dtype", "shape", "chunks")

    def __init__(self, dtype: torch.dtype, shape: list[int], chunks: list[memoryview]):
        self.dtype, self.shape, self.chunks = dtype, tuple(shape), chunks

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)

    def tensor(self) -> torch.Tensor:
        """The whole tensor (zero copy for one writable frame, else one gather)."""
        import torch
        if len(self.chunks) == 1 and not self.chunks[0].readonly:
            return torch.frombuffer(self.chunks[0], dtype=torch.uint8).view(self.dtype).view(self.shape)
        flat = torch.empty(self.nbytes, dtype=torch.uint8)
        out, off = flat.numpy(), 0
        for c in self.chunks:
            out[off:off + len(c)] = np.frombuffer(c, dtype=np.uint8)
            off += len(c)
        return flat.view(self.dtype).view(self.shape)

    def row_blocks(self, row_elems: int):
        """Yield (first_row, [n, row_elems] tensor) covering the tensor as rows of `row_elems`:
        views of the frames themselves, except a row cut by a frame boundary (copied alone)."""
        import torch
        row_bytes = row_elems * self.dtype.itemsize
        pending, row = bytearray(), 0
        for c in self.chunks:
            pos = 0
            if pending:                                  # finish the row the last frame cut
                take = min(row_bytes - len(pending), len(c))
                pending += c[:take]
                pos = take
                if len(pending) == row_bytes:
                    yield row, torch.frombuffer(pending, dtype=torch.uint8).view(self.dtype).view(1, row_elems)
                    pending, row = bytearray(), row + 1
            n = (len(c) - pos) // row_bytes
            if n:
                body = c[pos:pos + n * row_bytes]
                t = torch.frombuffer(body, dtype=torch.uint8) if not body.readonly else \
                    torch.tensor(np.frombuffer(body, dtype=np.uint8))
                yield row, t.view(self.dtype).view(n, row_elems)
                row += n
            pending += c[pos + n * row_bytes:]


def _claim(desc: dict, buffers: Sequence[memoryview], used: list[bool], path: str) -> list[memoryview]:
    shape = desc["shape"]
    first, count = desc["frames"]
    if first < 1 or first + count > len(buffers):
        fail(f"{path}.frames", f"frames {first}..{first + count - 1} out of range "
             f"(message has frames 1..{len(buffers) - 1})")
    nbytes = math.prod(shape) * ITEM_BYTES[desc["dtype"]]
    if nbytes > MAX_TENSOR_BYTES:
        fail(f"{path}.shape", f"{shape} is {nbytes} bytes, over {MAX_TENSOR_BYTES}")
    chunks = list(buffers[first:first + count])
    got = sum(len(c) for c in chunks)
    if got != nbytes:
        fail(path, f"{desc['dtype']}{shape} needs {nbytes} bytes, frames hold {got}")
    for i in range(first, first + count):
        if used[i]:
            fail(f"{path}.frames", f"frame {i} is claimed twice")
        used[i] = True
    return chunks


def framed_from_frames(desc: dict, buffers: Sequence[memoryview], used: list[bool],
                       path: str) -> FramedTensor:
    """Like `tensor_from_frames`, without joining the frames."""
    import torch
    chunks = _claim(desc, buffers, used, path)
    return FramedTensor(getattr(torch, desc["dtype"]), desc["shape"], chunks)


def tensor_from_frames(desc: dict, buffers: Sequence[memoryview], used: list[bool],
                       path: str) -> torch.Tensor:
    """Rebuild the tensor that `desc` (already checked with TENSOR_DESC) points at.

    `buffers[i]` is frame i; `used[i]` marks frames already claimed so that two tensors
    cannot share a frame and leftover frames can be reported by the caller.
    """
    import torch
    framed = framed_from_frames(desc, buffers, used, path)
    if framed.nbytes == 0:
        return torch.empty(framed.shape, dtype=framed.dtype)
    return framed.tensor()
