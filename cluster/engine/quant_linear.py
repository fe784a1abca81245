"""Packed int4/int8 weights on the CPU: GGUF quantized matmuls without float32 weights in the hot loop.

A decode step reads every weight once per token, so its time is the bytes read: the default
model's Q4_1 weights packed as int4 are ~1/7 of their float32 form. The kernels are torch's own
weight-only ones: `_weight_int4pack_mm_for_cpu` (groups of 32, per-group scale and zero) and
`_weight_int8pack_mm` (one scale per row). Both take bfloat16 activations and return bfloat16:
with float32 activations they run a scalar reference loop (~20x slower, measured on AVX2 and
AVX-512), so native weights round the activations entering each matmul and its outputs to
bfloat16, on every CPU where the kernels are vectorized (AVX2 and up; detected at run time).

Packed kernels win only for a few rows: they dequantize in registers, once per few rows, so their
time grows with the rows (compute-bound) while a GEMM's stays near its weight read. Above
`PACKED_MAX_ROWS` rows (a prefill, a decode batch above 16) a bfloat16 copy of the dequantized
weights (built on first use, ~2 bytes a weight) goes through oneDNN's bfloat16 GEMM: 2x the float32
GEMM at 200 rows (AVX-512 with bf16). In a decode step, whose weights come from memory, that GEMM
only breaks even with the kernel at 16 rows (BENCHMARKS.md, "A decode batch of 16 on the CPU"). The LM
head (Q8_0: two kernel passes) would gain from 6 rows on, but it stays on the kernels at every row count:
its logprobs must not depend on how many rows share a step (the unified worker returns the offline
engine's logprobs: tests/test_unified_batch.py). That copy rounds each dequantized weight
to bfloat16 (8 significant bits); activations and outputs round as the kernel's do. bfloat16
rounding turns any batching difference into ~1% logit noise: native weights are not batch-invariant,
so token-for-token comparisons use float32 weights (whose parameters hold exactly the packed values).

The kernel's dequantization is `(q - 8) * scale + zero`: a GGUF int4 group `q * scale + low`
maps exactly with `zero = low + 8 * scale`; only scale and zero are rounded to bfloat16 (the
kernel's scale dtype).
"""
from __future__ import annotations

import logging
import re
from typing import Optional

import torch

from cluster.engine.gguf_blocks import GROUP, QuantBlocks

logger = logging.getLogger(__name__)

_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", None)   # the direct binding: ~1 µs less than torch.ops
PACKED_MAX_ROWS = 16          # up to this many rows the packed kernel; above, a bfloat16 GEMM (dequantized copy)
SPLIT_PACKED_MAX_ROWS = 1 << 30   # a weight in two int4 parts (Q8_0: the tied LM head): always the kernels (row-invariant)
_VECTOR_CAPABILITIES = ("AVX2", "AVX512")


def native_kernels_available() -> bool:
    """True where torch's packed CPU kernels run vectorized code (x86 AVX2 / AVX-512)."""
    return (torch.backends.cpu.get_cpu_capability() in _VECTOR_CAPABILITIES
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class _Int4Part:
    """One int4 matmul: `(q - 8) * scale + zero` per group of 32, scale and zero in bfloat16."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        scale, zero = scale.bfloat16(), zero.bfloat16()
        self.scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()   # [groups, rows, 2]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self._unpacked = (q, scale.float(), zero.float())   # the float32 copy's source, dropped after

    def dequantize(self) -> torch.Tensor:
        q, scale, zero = self._unpacked
        rows, cols = q.shape
        groups = (q.view(rows, -1, GROUP).float() - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return groups.view(rows, cols)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (_INT4_MM or torch.ops.aten._weight_int4pack_mm_for_cpu)(x, self.packed, GROUP, self.scales)


class _Int8RowsPart:
    """One int8 matmul: `q * scale`, one bfloat16 scale per row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        # NOTE: a fresh, aligned buffer: the kernel crashes on a tensor at an odd offset of a safetensors file
        self.packed = q.clone(memory_format=torch.contiguous_format)
        self.scales = scale.view(-1).bfloat16()

    def dequantize(self) -> torch.Tensor:
        return self.packed.float() * self.scales.float().unsqueeze(1)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)


class PackedWeight:
    """One (possibly fused) weight [rows, cols] as packed matmul parts whose outputs add up.

    int4 groups: one part. int8 groups of 32 (Q8_0): `q = 16 * hi + lo` with hi in -8..7 and lo
    in 0..15, so `q * d = (hi + 8 - 8) * 16d + (lo - 8) * d + 8d`: two exact int4 parts (int8
    rows would need requantizing, which measured twice the logit error of everything else).
    int8 rows: one `_weight_int8pack_mm` part."""

    def __init__(self, blocks: QuantBlocks):
        self.shape = tuple(blocks.q.shape)
        self.exact: Optional[torch.Tensor] = None   # float32 holding exactly the packed values (attach_packed)
        self._bf16: Optional[torch.Tensor] = None
        if blocks.is_int4:
            self.parts = [_Int4Part(blocks.q, blocks.scale, blocks.low + 8 * blocks.scale)]
        elif blocks.group_size == GROUP:
            q, d = blocks.q.to(torch.int32), blocks.scale.bfloat16().float()   # 16 * bf16 d: exact
            self.parts = [_Int4Part((q >> 4) + 8, 16 * d, torch.zeros_like(d)), _Int4Part(q & 15, d, 8 * d)]
        else:
            self.parts = [_Int8RowsPart(blocks.q, blocks.scale)]

    @classmethod
    def fuse(cls, shards: list[QuantBlocks]) -> "PackedWeight":
        """Shards stacked along rows (q/k/v, gate/up); shards of different forms all go to int8 rows."""
        forms = {(s.is_int4, s.group_size) for s in shards}
        if len(forms) > 1 or not (next(iter(forms))[1] == GROUP or not next(iter(forms))[0]):
            shards = [s.to_int8() for s in shards]
        if len(shards) == 1:
            return cls(shards[0])
        low = None if shards[0].low is None else torch.cat([s.low for s in shards])
        return cls(QuantBlocks(torch.cat([s.q for s in shards]), torch.cat([s.scale for s in shards]), low))

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols]: exactly the values the kernels multiply."""
        return sum(p.dequantize() for p in self.parts)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """bfloat16 [n, cols] -> float32 [n, rows]."""
        out = self.parts[0].matmul(x).float()
        for p in self.parts[1:]:
            out += p.matmul(x)
        return out

    def bf16(self) -> torch.Tensor:
        """bfloat16 [rows, cols]: the dequantized weights rounded (built on first use, from `exact`)."""
        if self._bf16 is None:
            self._bf16 = _bf16_copy(self.exact)
        return self._bf16

    @property
    def is_split(self) -> bool:
        return len(self.parts) > 1

    def release_unpacked(self) -> None:
        for p in self.parts:
            if isinstance(p, _Int4Part):
                p._unpacked = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts for t in (p.packed, p.scales))


def _bf16_copy(exact: Optional[torch.Tensor]) -> torch.Tensor:
    if exact is None:
        raise RuntimeError("packed weight without its float32 values (attach_packed sets them)")
    return exact.detach().to(torch.bfloat16)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight, bias, dense_gemm,
                  out_float: bool = True):
    """Packed kernels up to `PACKED_MAX_ROWS` rows (`SPLIT_PACKED_MAX_ROWS` for a weight in two parts);
    above, `dense_gemm` in bfloat16 on the weights' bfloat16 copy, with the same bfloat16 rounding of
    inputs and outputs. `out_float=False`: a bfloat16 output as it is (one-part kernel or GEMM: its
    float32 values are exactly those), without bias."""
    xb = x.to(torch.bfloat16)
    if x.shape[0] <= (SPLIT_PACKED_MAX_ROWS if packed.is_split else PACKED_MAX_ROWS):
        if not out_float and bias is None and not packed.is_split:
            return packed.parts[0].matmul(xb)
        out = packed.matmul(xb)
    else:
        if packed.exact is None:   # a packed weight not made by attach_packed: `weight` holds its values
            packed.exact = weight
        out = dense_gemm(xb, packed.bf16())
        if not out_float and bias is None:
            return out
        out = out.float()
    return out if bias is None else out + bias


def param_for(hf_name: str, fused_shards: dict[str, tuple[str, int]]) -> tuple[str, int]:
    """HF tensor name -> (the model's parameter name, shard index in its fused weight); `fused_shards`
    is the model's HF projection -> (fused projection, shard) map (LlamaModel._FUSED)."""
    name = hf_name.removeprefix("model.")
    m = re.match(r"(layers\.\d+\.\w+\.)(\w+)\.weight$", name)
    if m and m.group(2) in fused_shards:
        fused, shard = fused_shards[m.group(2)]
        return f"{m.group(1)}{fused}.weight", shard
    return name, 0


@torch.no_grad()
def attach_packed(model: torch.nn.Module, blocks: dict[str, QuantBlocks]) -> int:
    """Give each weight with quantized blocks its PackedWeight (`param.packed`, read by
    `linear`), and overwrite the float32 parameter with the packed values. -> weights packed."""
    params = dict(model.named_parameters())
    by_param: dict[str, dict[int, QuantBlocks]] = {}
    for hf_name, b in blocks.items():
        name, shard = param_for(hf_name, getattr(type(model), "_FUSED", {}))
        if name == "lm_head.weight" and name not in params:
            continue   # tied head: the embedding's blocks serve it
        by_param.setdefault(name, {})[shard] = b
    for name, shards in by_param.items():
        param = params[name]
        packed = PackedWeight.fuse([shards[i] for i in sorted(shards)])
        if packed.shape != tuple(param.shape) or len(shards) != max(shards) + 1:
            raise ValueError(f"packed {name}: shape {packed.shape} != {tuple(param.shape)} or a shard missing")
        param.copy_(packed.dequantize())
        packed.release_unpacked()
        packed.exact = param   # holds exactly the packed values: the source of the bfloat16 copy
        param.packed = packed
    return len(by_param)


def packed_bytes(model: torch.nn.Module) -> int:
    return sum(p.packed.nbytes for p in model.parameters() if getattr(p, "packed", None) is not None)


def describe_cpu() -> str:
    flags = cpu_flags()
    native_bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return (f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
            f"{', '.join(native_bf16) if native_bf16 else 'no'}")


def weights_summary(model: torch.nn.Module) -> Optional[str]:
    n = sum(1 for p in model.parameters() if getattr(p, "packed", None) is not None)
    return f"{n} packed weights, {packed_bytes(model) / 2**20:.0f} MiB" if n else None
