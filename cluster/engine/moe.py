"""Feed-forward blocks: the dense SiLU-gated MLP and the sparse mixture of experts.

A sparse block routes each token to `top_k` of `num_experts` expert MLPs and sums their
outputs weighted by the router (Qwen3-MoE, Mixtral, DeepSeek-V2; the routing rules are
transformers', see `route`). DeepSeek adds shared experts: one dense MLP every token runs.

Experts are stored fused, as transformers 5 keeps them: `experts.gate_up_proj` `[E, 2I, H]`
(gate rows first) and `experts.down_proj` `[E, H, I]`; per-expert checkpoint tensors load
into their slices (model.py). The CPU path sorts the (token, expert) pairs by expert and runs
one GEMM pair per expert that received tokens: no work for an idle expert, no padding. On
CUDA with Triton the same runs as one fused grouped GEMM per projection (triton_moe.py), with
no host sync (CUDA graphs); `PDCLUSTER_MOE=torch` keeps the loop there too.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cluster.engine.linear import linear
from cluster.engine.model_config import ModelConfig, MoeConfig
from cluster.engine.parallel import TpGroup, row_parallel_linear

BACKEND_SWITCH = "PDCLUSTER_MOE"   # "torch": the expert loop on CUDA too


def use_fused_moe(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get(BACKEND_SWITCH, "") != "torch" and importlib.util.find_spec("triton") is not None


class MLP(nn.Module):
    """`tp`: this rank's slice of the intermediate, its down projection's sum all-reduced (parallel.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: Optional[TpGroup] = None):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        if self.tp is None:   # a shared expert: replicated on every rank
            return linear(F.silu(gate) * up, self.down_proj.weight)
        return row_parallel_linear(F.silu(gate) * up, self.down_proj.weight, self.tp)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x `[T, H]`, weights / ids `[T, k]` -> `sum_k weights[t, k] * expert_{ids[t, k]}(x[t])`."""
        if use_fused_moe(x):
            from cluster.engine.triton_moe import fused_experts
            return fused_experts(x, self.gate_up_proj, self.down_proj, weights, ids)
        return self.loop(x, weights, ids)

    def loop(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The plain path: one GEMM pair per expert that got tokens (syncs with the device once)."""
        k = ids.shape[1]
        order = ids.view(-1).argsort(stable=True)              # (token, slot) pairs grouped by expert
        token_of = order // k
        counts = torch.bincount(ids.view(-1), minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x[token_of]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:   # only the experts that got tokens
                gate, up = linear(xs[start:start + n], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[start:start + n] = linear(F.silu(gate) * up, self.down_proj[e])
                start += n
        out.mul_(weights.reshape(-1)[order, None].to(out.dtype))
        return torch.zeros_like(x).index_add_(0, token_of, out)


def route(logits: torch.Tensor, moe: MoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits `[T, E]` -> (weights, expert ids) `[T, top_k]`: softmax in float32, the top_k
    experts (with group-limited routing only among the `topk_groups` groups whose best expert scores
    highest), renormalised when the model says so, times `routed_scaling_factor`."""
    scores = logits.float().softmax(dim=-1)
    if moe.topk_method == "group_limited_greedy":
        grouped = scores.view(scores.shape[0], moe.num_groups, -1)
        best_groups = grouped.amax(dim=-1).topk(moe.topk_groups, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        scores = grouped.masked_fill(~keep[..., None], 0.0).view_as(scores)
    weights, ids = scores.topk(moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * moe.routed_scaling_factor, ids


class SparseMoe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe = self.moe = cfg.moe
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, cfg.hidden_size, moe.intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, moe.intermediate_size * moe.num_shared_experts)
                               if moe.num_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(linear(x, self.gate.weight), self.moe)
        out = self.experts(x, weights, ids)
        return out if self.shared_experts is None else out + self.shared_experts(x)
