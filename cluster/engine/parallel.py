"""Tensor parallelism: the ranks' process group (`TpGroup`) and how a model splits over them (`TpLayout`).

Megatron's split, as vLLM does it: q/k/v and gate/up are column-parallel (each rank holds its
heads' rows and its slice of the intermediate), o and down are row-parallel and end in one
all-reduce each; the embedding and the LM head are vocabulary-parallel (each rank holds
`ceil(vocab / tp)` rows, the last rank's tail zero-padded; lookups outside a rank's rows read
zero and one all-reduce sums them; the logits are all-gathered, so every rank samples from the
full vocabulary). Attention heads split evenly; KV heads split too, or when there are fewer KV
heads than ranks each is replicated on `tp / num_kv_heads` ranks (each rank keeps the one its
query heads read). Each rank's KV pool holds only its KV heads.

Not split (replicated on every rank, no collective): sparse MoE blocks (router, experts and
shared experts) and multi-head latent attention (its latent cache is one "head" every head
reads). Such layers compute the same on every rank; only dense attention and dense MLPs split.

A rank reads the checkpoint lazily (memory-mapped safetensors: the GGUF file's dequantized cache or
an HF directory) one full parameter at a time and keeps its slice (`TpLayout.shard`,
`LlamaModel.load_hf_shards`), so it holds its shard plus at most one full parameter; dummy weights
are drawn in full and cut, so every rank draws what the unsplit model does.

The collectives are torch.distributed: gloo on the CPU, NCCL on CUDA (whose collectives may be
captured in CUDA graphs). A collective that does not finish within the group's timeout raises.

TP-invariant numerics (`[model] tp_invariant`, `LlamaModel.set_tp_invariant`): only the row-parallel
sums round differently at another tp (every column-parallel slice is bitwise the full matmul's; the
embedding's all-reduce adds zeros, exactly), so with the row-parallel weights in float64 the partial
matmul and the all-reduce run in float64 and round once to the model dtype, on every tp size, 1
included: each tp size rounds nearly the same exact sum, and they agree to the last bit almost always
(BENCHMARKS.md, "Tensor parallelism: tp=3 logits against tp=1").
"""
from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from cluster.config_fields import ConfigError
from cluster.engine.linear import linear
from cluster.engine.model_config import ModelConfig

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TpGroup:
    """This process's place among a worker's `size` ranks; with size 1 every collective is a no-op."""
    rank: int = 0
    size: int = 1
    group: Optional[object] = None   # torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` side by side along the last dim, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `x` on every rank (in place)."""
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x


    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, tp: TpGroup) -> torch.Tensor:
    """`x @ weight.T` summed over the ranks, each holding a slice of the input features: a partial
    matmul, then one all-reduce. A float64 weight (tp-invariant numerics) makes both float64, rounded
    once to `x`'s dtype."""
    if weight.dtype != torch.float64:
        return tp.all_reduce(linear(x, weight))
    return tp.all_reduce(linear(x.double(), weight)).to(x.dtype)


def init_tp(rank: int, size: int, init_method: str, device: str = "cpu",
            timeout_s: float = DEFAULT_TIMEOUT_S) -> TpGroup:
    """Join the worker's ranks (`init_method`: `tcp://host:port` or `file://path`): gloo on the CPU,
    NCCL on CUDA. A collective that waits longer than `timeout_s` raises instead of hanging."""
    if size == 1:
        return TpGroup()
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return TpGroup(rank, size, dist.group.WORLD)


def close_tp(tp: TpGroup) -> None:
    if tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class TpLayout:
    """Which slice of each weight, head and vocabulary row rank `rank` of `tp` holds."""
    config: ModelConfig
    tp: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        cfg, tp = self.config, self.tp
        if tp < 1 or not 0 <= self.rank < tp:
            raise ConfigError("model", "tp", f"rank {self.rank} of tp={tp}")
        if tp == 1:
            return
        if cfg.mla is None:
            if cfg.num_heads % tp:
                raise ConfigError("model", "tp", f"num_heads {cfg.num_heads} is not divisible by tp={tp}")
            kv = cfg.num_kv_heads
            if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
                raise ConfigError("model", "tp", f"num_kv_heads {kv} and tp={tp}: one must divide the other")
        if self.has_dense_mlp and cfg.intermediate_size % tp:
            raise ConfigError("model", "tp", f"intermediate_size {cfg.intermediate_size} is not divisible "
                                             f"by tp={tp}")

    @property
    def has_dense_mlp(self) -> bool:
        cfg = self.config
        return cfg.moe is None or len(cfg.moe.sparse_layers) < cfg.num_layers

    # per-rank sizes
    @property
    def num_heads(self) -> int:
        return self.config.num_heads // self.tp if self.config.mla is None else self.config.num_heads

    @property
    def num_kv_heads(self) -> int:
        if self.config.mla is not None:
            return self.config.num_kv_heads
        return max(1, self.config.num_kv_heads // self.tp)

    @property
    def kv_head_start(self) -> int:
        """The first KV head this rank holds (query heads [rank * num_heads, ...) read it)."""
        return 0 if self.config.mla is not None else self.rank * self.config.num_kv_heads // self.tp

    @property
    def intermediate_size(self) -> int:
        return self.config.intermediate_size // self.tp

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.tp)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(planes, heads, dim) of this rank's KV pool per token and layer."""
        planes, heads, dim = self.config.kv_cache_shape
        return planes, (heads if self.config.mla is not None else self.num_kv_heads), dim

    # weights
    _QKV = re.compile(r"layers\.\d+\.self_attn\.qkv_proj\.(weight|bias)$")
    _O = re.compile(r"layers\.\d+\.self_attn\.o_proj\.weight$")
    _GATE_UP = re.compile(r"layers\.\d+\.mlp\.gate_up_proj\.weight$")
    _DOWN = re.compile(r"layers\.\d+\.mlp\.down_proj\.weight$")

    def is_row_parallel(self, name: str) -> bool:
        """Does parameter `name` end in the all-reduce of partial sums (dense o and down)?"""
        return bool((self.config.mla is None and self._O.search(name)) or self._DOWN.search(name))

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full (fused-layout) parameter `name`."""
        if self.tp == 1:
            return full
        if name in ("embed_tokens.weight", "lm_head.weight"):
            rows = full[self.vocab_start:self.vocab_start + self.vocab_per_rank]
            pad = self.vocab_per_rank - rows.shape[0]
            return torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows
        cfg = self.config
        if cfg.mla is None and self._QKV.search(name):
            q, k, v = full.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
            return torch.cat([self._heads(q, self.rank * self.num_heads, self.num_heads, 0),
                              self._heads(k, self.kv_head_start, self.num_kv_heads, 0),
                              self._heads(v, self.kv_head_start, self.num_kv_heads, 0)])
        if cfg.mla is None and self._O.search(name):
            return self._heads(full, self.rank * self.num_heads, self.num_heads, 1)
        size, start = self.intermediate_size, self.rank * self.intermediate_size
        if self._GATE_UP.search(name):
            gate, up = full.chunk(2)
            return torch.cat([gate[start:start + size], up[start:start + size]])
        if self._DOWN.search(name):
            return full[:, start:start + size]
        return full

    def _heads(self, w: torch.Tensor, first: int, count: int, dim: int) -> torch.Tensor:
        d = self.config.head_dim
        return w.narrow(dim, first * d, count * d)
