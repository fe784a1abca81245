"""GGUF quantized tensors -> the two block forms the packed CPU kernels take (quant_linear.py).

int4, groups of 32, affine: `w = q * scale + low`, q in 0..15. Q4_0 (scale d, low -8d), Q4_1
(scale d, low m) and Q4_K (super-blocks of 256 in eight sub-blocks of 32: scale d*sc, low
-dmin*m) are exactly this form, so their integers and group structure carry over unchanged.

int8, groups of 32: `w = q * scale`: Q8_0 exactly (quant_linear runs it as two int4 halves).

int8, one scale per output row: `w = q * scale`, q in -127..127. Every other quantized type
(Q6_K, Q5_*, ...) is dequantized and requantized to it: their blocks (16 or 32 values per
scale, 5 or 6 bits) fit neither int4 groups nor `_weight_int8pack_mm`, which takes one scale
per row. That changes the numerics; tests/test_quant_linear.py measures by how much.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

GROUP = 32   # int4 group size: the blocks of Q4_0/Q4_1 and the sub-blocks of Q4_K


@dataclass
class QuantBlocks:
    """One weight [rows, cols] in int4 groups (`low` set), int8 groups of 32 or int8 rows (`low` None)."""
    q: torch.Tensor                # [rows, cols]: uint8 0..15 (int4) or int8
    scale: torch.Tensor            # float32 [rows, cols // group_size]
    low: Optional[torch.Tensor]    # float32 [rows, cols // GROUP] (int4 only)

    @property
    def is_int4(self) -> bool:
        return self.low is not None

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        groups = self.q.view(rows, -1, self.group_size).float() * self.scale.unsqueeze(-1)
        if self.low is not None:
            groups = groups + self.low.unsqueeze(-1)
        return groups.view(rows, cols)

    def to_int8(self) -> "QuantBlocks":
        return requantize_int8(self.dequantize())

    def permute_rows(self, fn) -> "QuantBlocks":
        """The same row permutation on every field (llama.cpp's Q/K row order, gguf_weights._unpermute)."""
        def apply(t):
            return None if t is None else torch.from_numpy(np.ascontiguousarray(fn(t.numpy())))
        return QuantBlocks(apply(self.q), apply(self.scale), apply(self.low))


def requantize_int8(w: torch.Tensor) -> QuantBlocks:
    """Symmetric int8 per row; the scale is rounded to bfloat16 first (the kernel's scale dtype), so
    `q * scale` is exactly what the kernel multiplies."""
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-30).bfloat16().float()
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    return QuantBlocks(q, scale, None)


def from_gguf(data: np.ndarray, qtype, rows: int, cols: int) -> QuantBlocks:
    """A GGUF tensor's raw blocks (`ReaderTensor.data`, type `qtype`) as QuantBlocks."""
    import gguf
    T = gguf.GGMLQuantizationType
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size)
    if qtype in (T.Q4_0, T.Q4_1):
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        if qtype == T.Q4_0:
            low, qs = -8 * d, blocks[:, 2:]
        else:
            low, qs = blocks[:, 2:4].view(np.float16).astype(np.float32), blocks[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)          # low nibbles: values 0..15
        return _int4(q, d, low, rows, cols)
    if qtype == T.Q4_K:
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 256)                           # sub-blocks (chunk, nibble) in order
        return _int4(q, d * sc.astype(np.float32), -(dmin * m.astype(np.float32)), rows, cols)
    if qtype == T.Q8_0:
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)
        q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8).reshape(rows, cols))
        return QuantBlocks(q, torch.from_numpy(d.reshape(rows, cols // GROUP).copy()), None)
    w = gguf.quants.dequantize(data, qtype)
    return requantize_int8(torch.from_numpy(np.asarray(w, dtype=np.float32).reshape(rows, cols).copy()))


def _int4(q: np.ndarray, scale: np.ndarray, low: np.ndarray, rows: int, cols: int) -> QuantBlocks:
    def t(a, width):
        return torch.from_numpy(np.ascontiguousarray(a).reshape(rows, width))
    return QuantBlocks(t(q.astype(np.uint8), cols), t(scale.astype(np.float32), cols // GROUP),
                       t(low.astype(np.float32), cols // GROUP))
