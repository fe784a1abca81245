"""A small decode step on the CPU in fewer eager ops: the decoder layers as one flat loop.

A decode step of the default model on a small CPU spent a third of its time between its weight
matmuls: each of ~1,500 small eager ops costs 2-10 µs whatever its size, and every module call
adds Python on top (BENCHMARKS.md, "CPU decode in fewer ops": ~1,060 ops now).
This loop runs the same arithmetic as `DecoderLayer` for dense Llama-family layers (no MoE,
MLA or q/k norm, one rank), with fewer ops and no module calls:
- RoPE in place on the q and k heads of the qkv output (`x * cos + rotate(x) * sin` as
  roll, two in-place multiplies and one in-place add: the same roundings, so exact);
- one KV write for K and V together, through a view of the layer's two planes as one
  (the KV pool keeps V right after K);
- one request on consecutive pages (`ctx.kv_span`) reads K and V in place through one
  strided view each (the offsets computed once per step, not per layer);
- the o and down projections add into the residual straight from the packed kernel's
  bfloat16 output (`linear(..., residual=x)`: the same float32 sum, one conversion fewer);
- with native Q4 weights (every projection one packed int4 matmul) the kernel is called directly,
  between buffers made once (cpu_decode_native.py);
- one request's two attention matmuls run on the weight matmuls' threads: K and V come from
  memory (the layer's weights pushed them out of cache), and a second core reads half of them.
Several requests or scattered pages go through `decode_attention`; layer gates and listeners
(host tier loads, layer-wise KV) run around each layer as in the model's own loop.
Every op rounds like the module path's, so the float32 path stays token-exact with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from cluster.engine.attention import decode_attention, lowp_attention
from cluster.engine.attention_context import AttentionContext
from cluster.engine.cpu_decode_native import run_native
from cluster.engine.linear import linear, matmul_threads
from cluster.engine.quant_linear import PACKED_MAX_ROWS, _Int4Part

FLAT_DECODE = True   # False: every step through the modules (tests compare the two)


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: Optional[torch.Tensor]
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    kv: tuple[torch.Tensor, torch.Tensor]   # the layer's K and V caches [kv_heads, num_pages, page_size, D]
    kv_planes: torch.Tensor   # both as one [2 * kv_heads, num_pages * page_size, D]: K's heads, then V's
    k_offset: int             # storage offsets of the layer's K and V planes
    v_offset: int
    qkv_int4: Optional[_Int4Part] = None   # each weight's one packed int4 matmul (native Q4 weights), or None
    o_int4: Optional[_Int4Part] = None
    gate_up_int4: Optional[_Int4Part] = None
    down_int4: Optional[_Int4Part] = None


class DecodePlan:
    """The layers' weights and KV planes in the order one decode step reads them, built once per
    KV pool (`matches` says whether it still fits the model and caches at hand)."""

    def __init__(self, model, kv_caches):
        cfg = model.config
        self.eps, self.hidden = cfg.rms_norm_eps, cfg.hidden_size
        attn = model.layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale = attn.scale
        self.dtype = model.norm.weight.dtype
        self.page_size = kv_caches[0][0].shape[2]
        self.layers = [self._layer(layer, kv) for layer, kv in zip(model.layers, kv_caches)]
        self.native = all(w.qkv_int4 and w.o_int4 and w.gate_up_int4 and w.down_int4 for w in self.layers)
        self.native_buffers: dict = {}   # rows -> cpu_decode_native.NativeBuffers
        self.native_norms = None         # cpu_decode_native.native_norms

    def _layer(self, layer, kv) -> LayerWeights:
        k_cache, v_cache = kv
        kvh, num_pages, page_size, d = k_cache.shape
        planes = k_cache.as_strided((2 * kvh, num_pages * page_size, d), (num_pages * page_size * d, d, 1))
        attn, mlp = layer.self_attn, layer.mlp
        weights = (attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight, mlp.down_proj.weight)
        return LayerWeights(layer.input_layernorm.weight, weights[0], attn.qkv_proj.bias, weights[1],
                            layer.post_attention_layernorm.weight, *weights[2:], kv, planes, k_cache.storage_offset(),
                            v_cache.storage_offset(), *map(_one_int4_part, weights))

    def matches(self, model) -> bool:
        """False once the row-parallel weights went float64 (`set_tp_invariant`): the modules then."""
        return model.layers[0].self_attn.o_proj.weight.dtype == self.dtype

    @staticmethod
    def supports(model, kv_caches) -> bool:
        """Dense Llama-family layers on one rank, each layer's V plane right after its K plane."""
        weight = model.norm.weight
        if model.tp.size != 1 or weight.device.type != "cpu" or weight.dtype != torch.float32:
            return False
        if model.layers[0].self_attn.o_proj.weight.dtype != weight.dtype:
            return False
        for layer, kv in zip(model.layers, kv_caches):
            if not layer.is_plain:
                return False
            if len(kv) != 2 or not _planes_adjacent(*kv):
                return False
        return True


def _one_int4_part(weight: torch.Tensor) -> Optional[_Int4Part]:
    packed = weight.__dict__.get("packed")
    if packed is None or packed.is_split or not isinstance(packed.parts[0], _Int4Part):
        return None
    return packed.parts[0]


def _planes_adjacent(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    return (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and v_cache.data_ptr() == k_cache.data_ptr() + k_cache.numel() * k_cache.element_size())


def run_layers(plan: DecodePlan, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext,
               gates=(), listeners=()) -> torch.Tensor:
    """The decoder layers of a CPU decode step: x `[T, hidden]` -> the last layer's output (not normed).
    `gate(i)` / `listener(i)` before / after layer i, as the model's own loop calls them."""
    num_tokens, d = x.shape[0], plan.head_dim
    cos, sin, scale = _rope_rows(plan, rope)
    attend = Attend(plan, ctx, cos, sin, scale)
    if plan.native and num_tokens <= PACKED_MAX_ROWS:
        return run_native(plan, x, attend, gates, listeners)
    norm_shape, eps, rms_norm, silu = (plan.hidden,), plan.eps, torch.rms_norm, torch._C._nn.silu   # no F wrappers
    for i, w in enumerate(plan.layers):
        for hook in gates:
            hook(i)
        qkv = linear(rms_norm(x, norm_shape, w.input_norm, eps), w.qkv, w.qkv_bias).view(num_tokens, -1, d)
        x = linear(attend(qkv, w), w.o, residual=x)
        gate, up = linear(rms_norm(x, norm_shape, w.post_norm, eps), w.gate_up).chunk(2, dim=-1)
        x = linear(silu(gate) * up, w.down, residual=x)
        for hook in listeners:
            hook(i)
    return x


class Attend:
    """One layer's attention for the flat loop: RoPE in place on the q and k heads of `qkv` `[T, heads, D]`,
    the KV write, attention -> `[T, heads * D]` (float32)."""

    def __init__(self, plan: DecodePlan, ctx: AttentionContext, cos, sin, scale: float):
        self.heads, kvh = plan.num_heads, plan.num_kv_heads
        self.kv_heads2, self.half, self.qk_heads = 2 * kvh, plan.head_dim // 2, plan.num_heads + kvh
        self.cos, self.sin, self.scale, self.ctx = cos, sin, scale, ctx
        self.span = SpanViews(plan, ctx.kv_span, scale, matmul_threads()) if ctx.kv_span is not None else None
        self.slot_rows = None   # one token: its K and V rows as one strided copy, not an index_copy_
        if ctx.slot_mapping.numel() == 1:
            d = plan.head_dim
            self.slot_rows = ((self.kv_heads2, d), (plan.layers[0].kv_planes.stride(0), 1), int(ctx.slot_mapping) * d,
                              (self.kv_heads2, d), (d, 1), self.heads * d)

    def __call__(self, qkv: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        qk = qkv.narrow(1, 0, self.qk_heads)
        rotated = qk.roll(self.half, -1).mul_(self.sin)            # rotate_half's sign lives in `sin` (rotary.py)
        qk.mul_(self.cos).add_(rotated)
        if self.slot_rows is not None and qkv.is_contiguous():
            shape, strides, offset, src_shape, src_strides, src_offset = self.slot_rows
            w.kv_planes.as_strided(shape, strides, w.k_offset + offset).copy_(
                qkv.as_strided(src_shape, src_strides, qkv.storage_offset() + src_offset))
        else:
            w.kv_planes.index_copy_(1, self.ctx.slot_mapping,
                                    qkv.narrow(1, self.heads, self.kv_heads2).transpose(0, 1).to(w.kv_planes.dtype))
        if self.span is not None:
            return self.span.attention(qkv, w).float()
        return decode_attention(qkv.narrow(1, 0, self.heads), *w.kv, self.ctx, self.scale)


def _rope_rows(plan: DecodePlan, rope) -> tuple[torch.Tensor, torch.Tensor, float]:
    """cos, sin rows `[T, q + k heads, D]` and the softmax scale still to apply to q. A power-of-two scale
    (head_dim 64: 1/8) goes into q's rows: `(x * c) * s == x * (c * s)` exactly, one op per layer fewer."""
    cos, sin = rope
    if math.frexp(plan.scale)[0] != 0.5:
        return cos, sin, plan.scale
    t, kvh = cos.shape[0], plan.num_kv_heads
    rows = [torch.cat(((r * plan.scale).expand(t, plan.num_heads, -1), r.expand(t, kvh, -1)), dim=1) for r in rope]
    return rows[0], rows[1], 1.0


class SpanViews:
    """One request on consecutive pages: its K (transposed) and V read in place, `[kv_heads, D, L]` and
    `[kv_heads, L, D]` strided views of each layer's planes; the same arithmetic as attention._decode_span."""

    def __init__(self, plan: DecodePlan, kv_span: tuple[int, int], scale: float, threads: int = 0):
        first_page, seq_len = kv_span
        kvh, d = plan.num_kv_heads, plan.head_dim
        plane = plan.layers[0].kv_planes
        head_stride = plane.stride(0)
        self.start = first_page * plan.page_size * d
        self.k_shape, self.k_strides = (kvh, d, seq_len), (head_stride, 1, d)
        self.v_shape, self.v_strides = (kvh, seq_len, d), (head_stride, d, 1)
        self.q_shape, self.q_strides = (kvh, plan.num_heads // kvh, d), (plan.num_heads // kvh * d, d, 1)
        self.out_shape = (1, plan.num_heads * d)
        self.scale = scale
        self.threads = threads
        self.kv_dtype = plane.dtype

    def _bmm(self, a: torch.Tensor, b: torch.Tensor, op=torch.bmm, **kw) -> torch.Tensor:
        """On the weight matmuls' threads: at a few hundred keys the two matmuls wait on memory (K and V are
        out of cache after a layer's weights went through), so a second core reads half of each."""
        if not self.threads:
            return op(a, b, **kw)
        torch.set_num_threads(self.threads)
        try:
            return op(a, b, **kw)
        finally:
            torch.set_num_threads(1)

    def attention(self, qkv: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        return self.attention_of(qkv.as_strided(self.q_shape, self.q_strides, qkv.storage_offset()), w).view(
            self.out_shape)

    def attention_of(self, q: torch.Tensor, w: LayerWeights, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q `[kv_heads, G, D]` -> `[kv_heads, G, D]` (a bfloat16 KV: `[kv_heads, 1, G, D]`); `out`: a float32
        `[kv_heads, G, D]` buffer it lands in."""
        values = w.kv_planes.as_strided(self.v_shape, self.v_strides, w.v_offset + self.start)
        if self.kv_dtype != q.dtype:   # bfloat16 KV: attention._decode_span_lowp's arithmetic, output bfloat16
            keys = w.kv_planes.as_strided(self.v_shape, self.v_strides, w.k_offset + self.start)
            return self._bmm(q.to(self.kv_dtype).unsqueeze(1), keys, op=lowp_attention, values=values,
                             scale=self.scale)
        if self.scale != 1.0:
            q = q.mul(self.scale)
        keys_t = w.kv_planes.as_strided(self.k_shape, self.k_strides, w.k_offset + self.start)
        probs = self._bmm(q, keys_t).softmax(dim=-1)   # what matmul runs for 3-D operands, minus its checks
        return self._bmm(probs, values, out=out)
