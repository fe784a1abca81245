"""Llama-family decoder: Llama 2/3, SmolLM2, Qwen2 (q/k/v biases), Qwen3 (q/k RMSNorm).

Tokens of all requests are flattened to `[num_tokens, hidden]` so every projection is one
GEMM; only attention sees requests (through the AttentionContext). q/k/v and gate/up are
fused into one weight each: fewer, larger GEMMs. Weights load from HF tensor names.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from cluster.engine.attention import AttentionContext, paged_attention
from cluster.engine.linear import linear
from cluster.engine.model_config import ModelConfig
from cluster.engine.rotary import RotaryEmbedding, apply_rope

MAX_ROPE_POSITIONS = 32768   # cos/sin tables beyond this cost memory for nothing here


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`: torch's rms_norm computes in
        # float32 and rounds once like it (bit-identical on CPU); on CUDA one fused kernel instead of six
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
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
        return linear(paged_attention(q, k, v, kv[0], kv[1], ctx, self.scale), self.o_proj.weight)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, kv, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, min(cfg.max_position_embeddings, MAX_ROPE_POSITIONS),
                                    cfg.rope_theta, cfg.rope_scaling)
        self.layer_hook = None   # f(layer index) after each layer (kv_transfer.LayerStream: layer-wise KV)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches, ctx: AttentionContext):
        """-> final hidden states [num_tokens, hidden] (normed); `compute_logits` maps rows to vocab."""
        x = self.embed_tokens(input_ids)
        rope = self.rope.lookup(positions, x.dtype)
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x = layer(x, rope, kv, ctx)
            if self.layer_hook is not None:
                self.layer_hook(i)   # NOTE: on CUDA, layer i's kernels are launched, not yet done
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """float32 logits; `upcast=False` keeps the model dtype (argmax is the same: the upcast is exact)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight)
        return logits.float() if upcast else logits

    # weights
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @torch.no_grad()
    def load_hf_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy HF-named tensors (`model.layers.N.self_attn.q_proj.weight`, ...) into the fused layout."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, w in tensors.items():
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            m = re.match(r"(layers\.\d+\.\w+\.)(\w+)\.(weight|bias)$", name)
            if m and m.group(2) in self._FUSED:
                fused, shard = self._FUSED[m.group(2)]
                target = params[f"{m.group(1)}{fused}.{m.group(3)}"]
                sizes = self._shard_sizes(fused)
                start = sum(sizes[:shard])
                target[start:start + sizes[shard]].copy_(w)
                loaded.add(f"{m.group(1)}{fused}.{m.group(3)}#{shard}")   # every shard must come
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue   # tied: some checkpoints still ship a copy
            if name not in params:
                raise KeyError(f"unexpected weight {name!r}")
            params[name].copy_(w)
            loaded.add(name)
        shards = {n: len(self._shard_sizes(n.split(".")[-2])) for n in params
                  if ".qkv_proj." in n or ".gate_up_proj." in n}
        missing = [n for n in params if n not in loaded and
                   not (n in shards and all(f"{n}#{i}" in loaded for i in range(shards[n])))]
        if missing:
            raise KeyError(f"weights missing from checkpoint: {missing[:6]}{' ...' if len(missing) > 6 else ''}")

    def _shard_sizes(self, fused: str) -> list[int]:
        cfg = self.config
        if fused == "qkv_proj":
            return [cfg.q_size, cfg.kv_size, cfg.kv_size]
        return [cfg.intermediate_size, cfg.intermediate_size]
