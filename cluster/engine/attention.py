"""Paged attention: write the new tokens' KV into their pages, attend over each request's pages.

Cache layout per layer (see kv_cache.py): K and V are each `[num_kv_heads, num_pages, page_size,
head_dim]`. Gathering a request's pages along dim 1 then yields `[kv_heads, B, L, D]`
contiguous, so grouped-query attention runs as one batched matmul per layer with no repeat of K/V.

All metadata of one forward travels in one `AttentionContext`, built once on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class AttentionContext:
    num_reqs: int
    max_q_len: int                    # longest extend segment (1 for decode)
    slot_mapping: torch.Tensor        # int64 [T]: flat cache slot (page * page_size + offset) of each new token
    page_table: torch.Tensor          # int64 [B, P]: pages per request, padded with page 0
    mask: torch.Tensor                # decode: additive float [B, 1, L]; extend: bool [B, 1, Lq, L] (True = attend)
    q_index: Optional[torch.Tensor]   # int64 [B, Lq] token row for each padded query slot; None = rows already [B, Lq]
    out_index: Optional[torch.Tensor] # int64 [T]: padded row of each token, to unpad the output
    is_decode: bool

    @classmethod
    def build(cls, extend_lens: list[int], prefix_lens: list[int], page_tables: list[list[int]],
              bidirectional_lens: list[int], page_size: int, is_decode: bool, device) -> "AttentionContext":
        num_reqs = len(extend_lens)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        num_pages = max((s + page_size - 1) // page_size for s in seq_lens)
        pt = torch.zeros(num_reqs, num_pages, dtype=torch.int64)
        for i, (pages, s) in enumerate(zip(page_tables, seq_lens)):
            n = (s + page_size - 1) // page_size
            assert len(pages) >= n, f"request {i}: {len(pages)} pages for {s} tokens"
            pt[i, :n] = torch.tensor(pages[:n], dtype=torch.int64)
        positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(extend_lens))
        slot_mapping = pt[req_of_token, positions // page_size] * page_size + positions % page_size
        kpos = torch.arange(num_pages * page_size)
        seq_t = torch.tensor(seq_lens)
        is_decode = is_decode or all(e == 1 for e in extend_lens) and not any(bidirectional_lens)
        if is_decode:
            mask = torch.zeros(num_reqs, 1, kpos.numel())
            mask.masked_fill_(kpos[None, None, :] >= seq_t[:, None, None], float("-inf"))
            return cls(num_reqs, 1, slot_mapping.to(device), pt.to(device), mask.to(device), None, None, True)
        max_q = max(extend_lens)
        qj = torch.arange(max_q)
        qpos = torch.tensor(prefix_lens)[:, None] + qj[None, :]                    # [B, Lq]
        bidi = torch.tensor(bidirectional_lens or [0] * num_reqs)
        bstart = (seq_t - bidi)[:, None, None]
        causal = kpos[None, None, :] <= qpos[:, :, None]
        both_in_block = (qpos[:, :, None] >= bstart) & (kpos[None, None, :] >= bstart)
        mask = (causal | both_in_block) & (kpos[None, None, :] < seq_t[:, None, None])
        q_index = out_index = None
        if any(e != max_q for e in extend_lens):
            starts = torch.cumsum(torch.tensor([0] + extend_lens[:-1]), 0)
            ext = torch.tensor(extend_lens)
            q_index = (starts[:, None] + torch.minimum(qj[None, :], ext[:, None] - 1))  # pad rows repeat the last
            out_index = req_of_token * max_q + (torch.arange(positions.numel()) - starts[req_of_token])
            q_index, out_index = q_index.to(device), out_index.to(device)
        return cls(num_reqs, max_q, slot_mapping.to(device), pt.to(device), mask[:, None].to(device),
                   q_index, out_index, False)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             ctx: AttentionContext) -> None:
    """k, v: [T, kv_heads, D] into the flat slots of the layer's cache."""
    kvh, num_pages, page_size, d = k_cache.shape
    k_cache.view(kvh, num_pages * page_size, d).index_copy_(1, ctx.slot_mapping, k.transpose(0, 1))
    v_cache.view(kvh, num_pages * page_size, d).index_copy_(1, ctx.slot_mapping, v.transpose(0, 1))


def gather_kv(cache: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """[kv_heads, num_pages, page_size, D] -> [kv_heads, B, P * page_size, D] contiguous."""
    kvh, _, page_size, d = cache.shape
    b, p = ctx.page_table.shape
    return cache.index_select(1, ctx.page_table.view(-1)).view(kvh, b, p * page_size, d)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, ctx: AttentionContext, scale: float) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, kv_heads, D] (new tokens) -> [T, H * D]."""
    num_tokens, num_heads, d = q.shape
    kvh = k_cache.shape[0]
    group = num_heads // kvh
    write_kv(k_cache, v_cache, k, v, ctx)
    keys, values = gather_kv(k_cache, ctx), gather_kv(v_cache, ctx)
    if ctx.is_decode:
        # GQA as one batched matmul: [kvh, B, G, D] @ [kvh, B, D, L]
        qg = q.view(num_tokens, kvh, group, d).transpose(0, 1)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(scale).add_(ctx.mask)
        out = torch.matmul(scores.softmax(dim=-1), values)               # [kvh, B, G, D]
        return out.transpose(0, 1).reshape(num_tokens, num_heads * d)
    b, lq = ctx.num_reqs, ctx.max_q_len
    qp = q[ctx.q_index] if ctx.q_index is not None else q.view(b, lq, num_heads, d)
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.transpose(0, 1), values.transpose(0, 1),
                                         attn_mask=ctx.mask, scale=scale, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b * lq, num_heads * d)              # [B * Lq, H * D]
    return out[ctx.out_index] if ctx.out_index is not None else out
