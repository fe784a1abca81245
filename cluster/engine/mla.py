"""Multi-head latent attention (DeepSeek-V2): the KV cache holds one latent per token.

Per token, `kv_a_proj_with_mqa` yields a compressed latent `c` (`kv_lora_rank` values, then
RMSNorm) and one rope key `k_pe` (`qk_rope_head_dim`, shared by all heads). The cache stores
`[c, k_pe]` side by side: one plane, one "head" (kv_cache.py), `kv_lora_rank + qk_rope_head_dim`
values per token and layer instead of `2 * heads * head_dim`. Head h's key is
`[W_UK[h] c, k_pe]` and its value `W_UV[h] c`, with `kv_b_proj = [W_UK; W_UV]` per head.

- Prefill / extend (many queries per request): the expanded form. The latents of the
  request (its new tokens, or its pages when a prefix is cached) go through `kv_b_proj`
  into per-head keys and values, then SDPA, as transformers does. On CUDA a Triton kernel
  (triton_mla_prefill.py) takes them instead, with no padding, mask or per-head copy of the
  rope key: an extend over a cached prefix expands the batch's latent pages once and attends
  over them by page. A fresh prompt goes through SDPA (its padded batch and expanded keys)
  unless `PDCLUSTER_MLA_PREFILL=kernel`, which sends it through the same kernel over its new
  tokens' latents, causally: the two agree under Triton's CPU interpreter, but the kernel has
  never run on a GPU, so it stays opt-in until it is measured there (benchmarks/moe_gpu.py).
- Decode (one query per request): the absorbed form. `W_UK` is folded into the query
  (`q_nope W_UK[h]` lives in latent space), so the scores read the cached latents directly,
  the weighted sum of latents is taken first and `W_UV` applied once per head afterwards:
  nothing per cached token is expanded.

Rope is interleaved over pairs (rotary.apply_rope_interleaved), like transformers' DeepSeek-V2.
The attention context is the torch backend's on the CPU; on CUDA the Triton one (flat page list),
whose absorbed decode reads the latent pages in place with its own Triton kernel (triton_mla.py)
and whose extends use the prefill kernel; `PDCLUSTER_MLA=torch` at start keeps the torch context
and gathers the latents instead.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn

from cluster.engine.attention import gather_kv
from cluster.engine.attention_context import AttentionContext
from cluster.engine.linear import linear
from cluster.engine.model_config import ModelConfig
from cluster.engine.norm import RMSNorm
from cluster.engine.rotary import apply_rope_interleaved, softmax_mscale

BACKEND_SWITCH = "PDCLUSTER_MLA"   # "torch": gather the latents and use torch ops on CUDA too
FRESH_PREFILL_SWITCH = "PDCLUSTER_MLA_PREFILL"   # "kernel": fresh prompts on a Triton context through it
LATENT_NORM_EPS = 1e-6   # transformers' DeepseekV2RMSNorm default: the latent norms ignore rms_norm_eps


@functools.cache
def _kernels_take(mla) -> bool:
    """Triton is installed and both kernels take these widths (looked up once: every step asks)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from cluster.engine import triton_mla, triton_mla_prefill
    return triton_mla.supports(mla.kv_lora_rank, mla.qk_rope_head_dim) and \
        triton_mla_prefill.supports(mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim)


def use_triton_mla(device: torch.device, mla) -> bool:
    """The Triton kernels run on CUDA for widths they take: the model runner then builds Triton
    attention contexts, and decode steps can be CUDA graphs."""
    return device.type == "cuda" and os.environ.get(BACKEND_SWITCH, "") != "torch" and _kernels_take(mla)


def latent_pages(ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode kernel's (pages, page_start, seq_lens) from either attention context."""
    if ctx.pages is not None:   # a decode CUDA graph's context: flat page list
        return ctx.pages, ctx.page_start, ctx.seq_lens
    width = ctx.page_table.shape[1]   # the torch context's padded page table
    page_start = torch.arange(0, ctx.num_reqs * width, width, device=ctx.page_table.device)
    return ctx.page_table.reshape(-1), page_start, ctx.positions + 1


class MlaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = self.mla = cfg.mla
        self.num_heads = cfg.num_heads
        qk_size, bias = cfg.num_heads * m.qk_head_dim, cfg.attention_bias
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, qk_size, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, m.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, qk_size, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, cfg.num_heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * m.v_head_dim, cfg.hidden_size, bias=bias)
        self.scale = m.qk_head_dim ** -0.5 * softmax_mscale(cfg.rope_scaling)

    def forward(self, x, rope, kv, ctx: AttentionContext):
        m, t = self.mla, x.shape[0]
        if m.q_lora_rank is None:
            q = linear(x, self.q_proj.weight)
        else:
            q = linear(self.q_a_layernorm(linear(x, self.q_a_proj.weight, self.q_a_proj.bias)), self.q_b_proj.weight)
        q_nope, q_pe = q.view(t, self.num_heads, m.qk_head_dim).split([m.qk_nope_head_dim, m.qk_rope_head_dim], -1)
        c, k_pe = linear(x, self.kv_a_proj_with_mqa.weight, self.kv_a_proj_with_mqa.bias).split(
            [m.kv_lora_rank, m.qk_rope_head_dim], -1)
        q_pe = apply_rope_interleaved(q_pe, *rope)
        latent = torch.cat((self.kv_a_layernorm(c), apply_rope_interleaved(k_pe[:, None], *rope)[:, 0]), dim=-1)
        cache = kv[0]                                                    # [1, num_pages, page_size, rank + rope]
        cache.view(-1, cache.shape[-1]).index_copy_(0, ctx.slot_mapping, latent)
        if ctx.is_decode:
            out = self._decode_absorbed(q_nope, q_pe, cache, ctx)
        else:
            out = self._extend_expanded(q_nope, q_pe, latent, cache, ctx)
        return linear(out, self.o_proj.weight, self.o_proj.bias)

    def _up_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK `[H, nope, rank]`, W_UV `[H, v, rank]`: views of kv_b_proj."""
        m = self.mla
        w = self.kv_b_proj.weight.view(self.num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        return w[:, :m.qk_nope_head_dim], w[:, m.qk_nope_head_dim:]

    def _decode_absorbed(self, q_nope, q_pe, cache, ctx: AttentionContext) -> torch.Tensor:
        w_uk, w_uv = self._up_weights()
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, rank]
        # the latent pages read in place, once per request (a Triton context asks for the kernels
        # anywhere: the CPU under TRITON_INTERPRET=1 in tests)
        if ctx.backend == "triton" or use_triton_mla(cache.device, self.mla):
            from cluster.engine.triton_mla import decode_latent
            out_latent = decode_latent(q_latent, q_pe, cache[0], *latent_pages(ctx), self.scale)
        else:
            q_full = torch.cat((q_latent, q_pe), dim=-1)
            latents = gather_kv(cache, ctx)[0]                             # [B, L, rank + rope]
            scores = torch.baddbmm(ctx.mask.to(q_pe.dtype), q_full, latents.transpose(1, 2), alpha=self.scale)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_pe.dtype)
            out_latent = torch.bmm(probs, latents[..., :self.mla.kv_lora_rank])  # [B, H, rank]
        out = q_pe.new_empty(q_pe.shape[0], self.num_heads, self.mla.v_head_dim)
        # NOTE: written through the [H, B, v] view in place (a strided batched GEMM), no transpose copy
        torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out.view(q_pe.shape[0], -1)

    def _extend_expanded(self, q_nope, q_pe, latent, cache, ctx: AttentionContext) -> torch.Tensor:
        m, h = self.mla, self.num_heads
        if ctx.kv_limit is not None:     # the Triton context, over a cached prefix
            return self._extend_over_pages(q_nope, q_pe, cache, ctx)
        if ctx.q_start is not None and os.environ.get(FRESH_PREFILL_SWITCH, "") == "kernel":
            # the Triton context, fresh prompts: rows are the new tokens (page size 1, request b's
            # from q_start[b]), each token sees its request's rows up to itself
            return self._attend_expanded(q_nope, q_pe, latent, ctx, ctx.q_start, ctx.positions + 1, 1)
        b, lq = ctx.num_reqs, ctx.max_q_len
        pad = (lambda x: x[ctx.q_index]) if ctx.q_index is not None else (lambda x: x.view(b, lq, *x.shape[1:]))
        # prompts from position 0 see only their own new tokens: skip the cache read
        latents = pad(latent) if ctx.mask is None else gather_kv(cache, ctx)[0]   # [B, L, rank + rope]
        length = latents.shape[1]
        c, k_pe = latents.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv = linear(c.reshape(b * length, -1), self.kv_b_proj.weight).view(b, length, h, -1)
        k_nope, values = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        keys = torch.cat((k_nope, k_pe[:, :, None].expand(b, length, h, m.qk_rope_head_dim)), dim=-1)
        query = pad(torch.cat((q_nope, q_pe), dim=-1))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=ctx.mask, is_causal=ctx.mask is None, scale=self.scale)
        out = out.transpose(1, 2).reshape(b * lq, h * m.v_head_dim)
        return out[ctx.out_index] if ctx.out_index is not None else out

    def _extend_over_pages(self, q_nope, q_pe, cache, ctx: AttentionContext) -> torch.Tensor:
        """Every latent of the batch's pages expanded once, in flat-page-list order, then the
        Triton kernel over them (new tokens included: their latents are in the pages already)."""
        latents = cache[0].index_select(0, ctx.pages).view(-1, cache.shape[-1])     # [pages * size, rank + rope]
        return self._attend_expanded(q_nope, q_pe, latents, ctx, ctx.page_start, ctx.kv_limit, cache.shape[2])

    def _attend_expanded(self, q_nope, q_pe, latents, ctx: AttentionContext, page_start, kv_limit,
                         page_size: int) -> torch.Tensor:
        """`latents` `[rows, rank + rope]` through kv_b_proj (keys' nope part and values per head),
        then the Triton prefill kernel; the rope keys stay the latents' shared tails."""
        from cluster.engine.triton_mla_prefill import extend_expanded
        rank = self.mla.kv_lora_rank
        kv = linear(latents[:, :rank], self.kv_b_proj.weight).view(latents.shape[0], self.num_heads, -1)
        out = extend_expanded(q_nope, q_pe, kv, latents[:, rank:], page_start, ctx.q_start, ctx.extend_lens_t,
                              kv_limit, ctx.max_q_len, page_size, self.scale)
        return out.reshape(q_pe.shape[0], -1)
