"""The flat CPU decode loop with native Q4 weights (every projection one packed int4 matmul): cpu_decode.py's
`run_layers` for a step of up to `PACKED_MAX_ROWS` rows, with the ops between the kernels cut.

What enters a kernel (both norms, silu(gate) * up) is rounded to bfloat16 by the op that computes it; what
leaves it is copied into float32 buffers made once per plan and row count, whose views (q, k, v heads,
gate, up, the rotated halves) are made once too, so a layer allocates almost nothing and makes no views:
- each qkv row is stored `D + D/2` wide, its first half repeated after it: `rotate_half(x)` (as `roll`
  gives it) is then the view `[D/2, 3D/2)` of the row, and RoPE is four ops that allocate nothing (no
  roll, narrow or cat);
- RMSNorm is one reduction and three elementwise kernels (`_norm`);
- the residual adds the o and down kernels' bfloat16 outputs in place (the same float32 sum);
- silu runs in place on the gate half of the gate/up buffer.
31 ops a layer where the loop before took 41 (4 of them the kernels). Every op but the norm rounds as the
module path's; the norm's last float32 bits differ, so the logits are the modules' within bfloat16 noise
(tests/test_cpu_decode_native.py).
"""
from __future__ import annotations

import math

import torch

from cluster.engine.attention import decode_attention
from cluster.engine.gguf_blocks import GROUP
from cluster.engine.linear import matmul_threads
from cluster.engine.quant_linear import _INT4_MM


class NativeBuffers:
    """One step's float32 and bfloat16 buffers for `rows` tokens, and their views."""

    def __init__(self, plan, rows: int):
        d, heads, kvh = plan.head_dim, plan.num_heads, plan.num_kv_heads
        qk_heads, half = heads + kvh, d // 2
        inter = plan.layers[0].gate_up.shape[0] // 2
        self.rows, self.qkv_shape = rows, (rows, qk_heads + kvh, d)
        self.norm_tmp = torch.empty(rows, plan.hidden)         # x / root
        self.norm_root = torch.empty(rows, 1)                   # sqrt(sum(x^2) + H * eps)
        self.norm_eps = torch.tensor(math.sqrt(plan.hidden * plan.eps))
        self.normed = torch.empty(rows, plan.hidden, dtype=torch.bfloat16)
        wide = torch.empty(rows, qk_heads + kvh, d + half)      # q, k, v heads, each row + its first half again
        self.qkv = wide[:, :, :d]
        self.qk, self.kv = wide[:, :qk_heads, :d], wide[:, heads:, :d]
        self.q = wide[:, :heads, :d]
        self.first_half, self.first_half_again = wide[:, :qk_heads, :half], wide[:, :qk_heads, d:]
        self.rotated = wide[:, :qk_heads, half:]               # rotate_half(x) before rotate_half's sign (in sin)
        self.rotated_sin = torch.empty(rows, qk_heads, d)
        self.kv_by_head = self.kv.transpose(0, 1)              # [2 * kv_heads, rows, D]: the KV write's source
        self.attn = torch.empty(rows, heads * d, dtype=torch.bfloat16)
        self.gate_up = torch.empty(rows, 2 * inter)
        self.gate, self.up = self.gate_up[:, :inter], self.gate_up[:, inter:]
        self.act = torch.empty(rows, inter, dtype=torch.bfloat16)
        self.kv_row = self.kv[0] if rows == 1 else None           # one token's K then V heads [2 * kv_heads, D]
        self.q_groups = self.q[0].unflatten(0, (kvh, heads // kvh)) if rows == 1 else None   # [kv_heads, G, D]
        self.attn_groups = self.attn.view(kvh, heads // kvh, d) if rows == 1 else None
        self.span_out = torch.empty(kvh, heads // kvh, d)   # one request's attention output (float32 KV)
        self.qkv_biases = [None if w.qkv_bias is None else w.qkv_bias.view(qk_heads + kvh, d) for w in plan.layers]


def buffers_for(plan, rows: int) -> NativeBuffers:
    buffers = plan.native_buffers.get(rows)
    if buffers is None:
        buffers = plan.native_buffers[rows] = NativeBuffers(plan, rows)
    return buffers


def native_norms(plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer its two RMSNorm weights times sqrt(hidden) (`_norm`), made once per plan."""
    if plan.native_norms is None:
        root = math.sqrt(plan.hidden)
        plan.native_norms = [(w.input_norm * root, w.post_norm * root) for w in plan.layers]
    return plan.native_norms


def run_native(plan, x: torch.Tensor, attend, gates, listeners) -> torch.Tensor:
    """The decoder layers (x `[T, hidden]` float32 -> the last layer's output, not normed) with every weight
    one packed int4 kernel; `attend` is cpu_decode.Attend (its cos/sin rows, KV write slots and span views)."""
    b = buffers_for(plan, x.shape[0])
    x = x.clone()   # the residual stream, added into in place
    mm, silu_, mul = int4_matmul(matmul_threads()), torch._C._nn.silu_, torch.mul
    for i, (w, norm_weights) in enumerate(zip(plan.layers, native_norms(plan))):
        for hook in gates:
            hook(i)
        b.qkv.copy_(mm(_norm(x, norm_weights[0], b), w.qkv_int4).view(b.qkv_shape))
        if w.qkv_bias is not None:
            b.qkv.add_(b.qkv_biases[i])
        _attention(attend, b, w)
        x.add_(mm(b.attn, w.o_int4))
        b.gate_up.copy_(mm(_norm(x, norm_weights[1], b), w.gate_up_int4))
        x.add_(mm(mul(silu_(b.gate), b.up, out=b.act), w.down_int4))
        for hook in listeners:
            hook(i)
    return x


def _norm(x: torch.Tensor, weight: torch.Tensor, b: NativeBuffers) -> torch.Tensor:
    """RMSNorm rounded into `b.normed`: `x / sqrt(sum(x^2) + H * eps) * (weight * sqrt(H))` (`weight` comes
    scaled: `native_norms`), which is `x * rsqrt(mean(x^2) + eps) * weight` in one reduction kernel and
    three elementwise ones, all into buffers: 6.4 against 12.6 us (the six-op form it replaced,
    mean two of them) and 15 us (`torch.rms_norm`, a composite of ~20 on the CPU) here. It rounds
    differently in float32's last bits: its bfloat16 values are torch.rms_norm's but for one step in
    ~1 element in 100,000 (tests/test_cpu_decode_native.py)."""
    root = torch.hypot(torch.linalg.vector_norm(x, 2, -1, True, out=b.norm_root), b.norm_eps, out=b.norm_root)
    return torch.mul(torch.div(x, root, out=b.norm_tmp), weight, out=b.normed)


def _attention(attend, b: NativeBuffers, w) -> None:
    """RoPE in place on the q and k heads, the KV write, attention into `b.attn` (bfloat16)."""
    b.first_half_again.copy_(b.first_half)
    torch.mul(b.rotated, attend.sin, out=b.rotated_sin)        # rotate_half's sign lives in `sin` (rotary.py)
    b.qk.mul_(attend.cos).add_(b.rotated_sin)
    if attend.slot_rows is not None:
        shape, strides, offset = attend.slot_rows[:3]
        w.kv_planes.as_strided(shape, strides, w.k_offset + offset).copy_(b.kv_row)
    else:
        w.kv_planes.index_copy_(1, attend.ctx.slot_mapping, b.kv_by_head.to(w.kv_planes.dtype))
    span = attend.span
    if span is None:
        b.attn.copy_(decode_attention(b.q, *w.kv, attend.ctx, attend.scale).view(b.attn.shape))
    elif span.kv_dtype != torch.float32:
        b.attn.copy_(span.attention_of(b.q_groups, w).view(b.attn.shape))
    else:
        b.attn_groups.copy_(span.attention_of(b.q_groups, w, out=b.span_out))


def int4_matmul(threads: int):
    """`mm(x_bf16, part)` -> the packed kernel's bfloat16 output, on `threads` torch threads (0: as set)."""
    kernel = _INT4_MM or torch.ops.aten._weight_int4pack_mm_for_cpu
    if not threads:
        return lambda xb, part: kernel(xb, part.packed, GROUP, part.scales)
    set_threads = torch.set_num_threads

    def mm(xb: torch.Tensor, part) -> torch.Tensor:
        set_threads(threads)
        try:
            return kernel(xb, part.packed, GROUP, part.scales)
        finally:
            set_threads(1)
    return mm
