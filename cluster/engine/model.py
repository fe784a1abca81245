"""The decoder: Llama 2/3, SmolLM2, Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm); with sparse MoE
feed-forward blocks (moe.py: Qwen3-MoE, Mixtral, DeepSeek-V2) and latent attention (mla.py: DeepSeek-V2).

Tokens of all requests are flattened to `[num_tokens, hidden]` so every projection is one
GEMM; only attention sees requests (through the AttentionContext). q/k/v and gate/up are
fused into one weight each: fewer, larger GEMMs. Weights load from HF tensor names.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from cluster.engine.attention import AttentionContext, paged_attention
from cluster.engine import cpu_decode
from cluster.engine.cpu_decode import DecodePlan, run_layers
from cluster.engine.linear import linear
from cluster.engine.mla import MlaAttention
from cluster.engine.model_config import ModelConfig
from cluster.engine.moe import MLP, SparseMoe
from cluster.engine.norm import RMSNorm
from cluster.engine.parallel import TpGroup, TpLayout, row_parallel_linear
from cluster.engine.rotary import RotaryEmbedding, apply_rope

__all__ = ["LlamaModel", "RMSNorm"]

MAX_ROPE_POSITIONS = 32768   # cos/sin tables beyond this cost memory for nothing here


class Attention(nn.Module):
    """This rank's heads: column-parallel qkv, row-parallel o ending in one all-reduce (parallel.py)."""

    def __init__(self, cfg: ModelConfig, layout: TpLayout, tp: TpGroup):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = layout.num_heads, layout.num_kv_heads, cfg.head_dim
        self.tp = tp
        q_size, kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, rope, kv, ctx: AttentionContext):
        qkv = linear(x, self.qkv_proj.weight, self.qkv_proj.bias).view(x.shape[0], -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is None:   # q and k heads side by side: rotate them in one pass
            q, k = apply_rope(qkv[:, :self.num_heads + self.num_kv_heads], *rope).split(
                [self.num_heads, self.num_kv_heads], dim=1)
        else:
            q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        out = paged_attention(q, k, v, kv[0], kv[1], ctx, self.scale)
        return row_parallel_linear(out, self.o_proj.weight, self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, layout: TpLayout, tp: TpGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layout, tp) if cfg.mla is None else MlaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sparse = cfg.moe is not None and index in cfg.moe.sparse_layers
        self.mlp = SparseMoe(cfg) if sparse else MLP(cfg.hidden_size, layout.intermediate_size, tp)
        self.is_plain = cfg.mla is None and not cfg.qk_norm and not sparse   # what cpu_decode.py runs

    def forward(self, x, rope, kv, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The whole model, or with a `TpGroup` of several ranks this rank's shard of it (parallel.py)."""

    def __init__(self, cfg: ModelConfig, tp: TpGroup = TpGroup()):
        super().__init__()
        self.config, self.tp = cfg, tp
        self.layout = layout = TpLayout(cfg, tp.size, tp.rank)
        self.embed_tokens = nn.Embedding(layout.vocab_per_rank, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, layout, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else nn.Linear(cfg.hidden_size, layout.vocab_per_rank, bias=False))
        self.rope = RotaryEmbedding(cfg.head_dim, min(cfg.max_position_embeddings, MAX_ROPE_POSITIONS),
                                    cfg.rope_theta, cfg.rope_scaling)
        self._layer_listeners: list[Callable[[int], None]] = []
        self._layer_gates: list[Callable[[int], None]] = []
        self._decode_plan: Optional[DecodePlan] = None
        self._plan_checked_for = None   # the KV caches the plan was last built or refused for

    @torch.no_grad()
    def set_tp_invariant(self, on: bool) -> None:
        """The row-parallel weights in float64, so their sums are the same at every tp (parallel.py;
        `[model] tp_invariant`), or back in the model dtype (exactly: they were loaded in it)."""
        dtype = torch.float64 if on else self.norm.weight.dtype
        for name, p in self.named_parameters():
            if self.layout.is_row_parallel(name):
                p.data = p.data.to(dtype)

    def add_layer_listener(self, listener: Callable[[int], None]) -> None:
        """`listener(i)` after each decoder layer i of an eager forward (kv_transfer.LayerStream:
        layer-wise KV). A captured CUDA graph replays without calling it."""
        self._layer_listeners.append(listener)

    def add_layer_gate(self, gate: Callable[[int], None]) -> None:
        """`gate(i)` before each decoder layer i of an eager forward (host_tier.HostTier: layer i's
        KV loaded). A captured CUDA graph replays without calling it."""
        self._layer_gates.append(gate)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, ctx: AttentionContext):
        """-> final hidden states [num_tokens, hidden] (normed); `compute_logits` maps rows to vocab."""
        x = self._embed(input_ids)
        rope = self.rope.lookup(positions, x.dtype)
        plan = self._cpu_decode_plan(kv_caches, ctx)
        if plan is not None:
            return self.norm(run_layers(plan, x, rope, ctx, self._layer_gates, self._layer_listeners))
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            for gate in self._layer_gates:
                gate(i)
            x = layer(x, rope, kv, ctx)
            for listener in self._layer_listeners:
                listener(i)          # NOTE: on CUDA, layer i's kernels are launched, not yet done
        return self.norm(x)

    def _cpu_decode_plan(self, kv_caches, ctx: AttentionContext) -> Optional[DecodePlan]:
        """The flat decode loop's plan (cpu_decode.py) for a CPU decode step of a model it covers."""
        if not cpu_decode.FLAT_DECODE or not ctx.is_decode or ctx.backend != "torch":
            return None
        plan = self._decode_plan
        if self._plan_checked_for is not kv_caches or (plan is not None and not plan.matches(self)):
            self._plan_checked_for = kv_caches
            plan = self._decode_plan = DecodePlan(self, kv_caches) if DecodePlan.supports(self, kv_caches) else None
        return plan

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.layout.vocab_start   # vocabulary-parallel: rows outside this rank read zero
        outside = (local < 0) | (local >= self.layout.vocab_per_rank)
        x = self.embed_tokens(local.masked_fill(outside, 0)).masked_fill(outside[:, None], 0.0)
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """float32 logits; `upcast=False` keeps the model dtype (argmax is the same: the upcast is exact).
        Under tensor parallelism every rank gets the full vocabulary's (gathered, padding cut)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits)[..., :self.config.vocab_size]
        return logits.float() if upcast else logits

    # weights
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    _SHARDED = re.compile(r"(layers\.\d+\.[\w.]+\.)(\w+)\.(weight|bias)$")
    _EXPERT = re.compile(r"(layers\.\d+\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

    @torch.no_grad()
    def load_hf_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...) into the fused layout.
        Every parameter must be filled exactly once, slice by slice for fused ones."""
        params = dict(self.named_parameters())
        sources = self._weight_sources(tensors.keys(), params)
        for target, p in params.items():
            _fill(p, target, sources.get(target, []), tensors)

    @torch.no_grad()
    def load_hf_shards(self, full: "LlamaModel", tensors: Mapping[str, torch.Tensor]) -> None:
        """This rank's slice of every parameter (`layout.shard`), filled one full parameter at a time:
        `full` is the unsplit model on the meta device (names and shapes only), and `tensors` may read
        lazily (safetensors' `safe_open`), so a rank never holds more of the whole model than its
        largest parameter."""
        full_params = dict(full.named_parameters())
        sources = full._weight_sources(tensors.keys(), full_params)
        for target, p in self.named_parameters():
            whole = torch.empty(full_params[target].shape, dtype=p.dtype)
            _fill(whole, target, sources.get(target, []), tensors)
            part = self.layout.shard(target, whole)
            if part.shape != p.shape:
                raise ValueError(f"shard of {target!r} has shape {tuple(part.shape)}, expected {tuple(p.shape)}")
            p.copy_(part)

    def _weight_sources(self, names, params: dict) -> dict[str, list[tuple[str, Optional[tuple]]]]:
        """parameter -> [(checkpoint tensor name, index into the parameter it fills)]."""
        sources: dict[str, list] = {}
        for name in names:
            short = name.removeprefix("model.")
            if "rotary_emb" in short or (short == "lm_head.weight" and self.lm_head is None):
                continue   # tied: some checkpoints still ship a copy
            target, index = self._weight_target(short, params)
            if target not in params:
                raise KeyError(f"unexpected weight {short!r}")
            sources.setdefault(target, []).append((name, index))
        return sources

    def _weight_target(self, name: str, params: dict) -> tuple[str, Optional[tuple]]:
        """(parameter, index into it) that the checkpoint tensor `name` fills."""
        m = self._EXPERT.match(name)
        if m:   # one expert's projection: its slice of the fused expert weights
            expert, proj = int(m.group(2)), m.group(3)
            if proj == "down_proj":
                return f"{m.group(1)}down_proj", (expert,)
            size = self.config.moe.intermediate_size
            start = size if proj == "up_proj" else 0
            return f"{m.group(1)}gate_up_proj", (expert, slice(start, start + size))
        m = self._SHARDED.match(name)
        if m and m.group(2) in self._FUSED:
            fused, shard = self._FUSED[m.group(2)]
            target = f"{m.group(1)}{fused}.{m.group(3)}"
            if target in params:   # MLA keeps its own q_proj
                sizes = self._shard_sizes(fused, params[target])
                start = sum(sizes[:shard])
                return target, (slice(start, start + sizes[shard]),)
        return name, None

    def _shard_sizes(self, fused: str, param: torch.Tensor) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            return [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return [param.shape[0] // 2] * 2   # dense MLPs and shared experts differ in width


@torch.no_grad()
def _fill(param: torch.Tensor, target: str, sources: list, tensors: Mapping[str, torch.Tensor]) -> None:
    """`param` from its checkpoint tensors, each exactly once (slice by slice for fused ones)."""
    filled = 0
    for name, index in sources:
        w = tensors[name]
        dst = param if index is None else param[index]
        if dst.numel() != w.numel():
            raise ValueError(f"weight {name!r} has shape {tuple(w.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(w.reshape(dst.shape))
        filled += w.numel()
    if filled != param.numel():
        raise KeyError(f"weights missing from checkpoint: {target}")
