"""AttentionContext: all attention metadata of one forward, built once on the CPU, shared by all layers.

Two backends read it (see attention.py):
- "torch" (CPU, and CUDA without Triton): a padded page table `[B, P]`; decode takes an additive
  mask `[B, 1, L]`, an extend over a cached prefix a boolean mask `[B, 1, Lq, L]`.
- "triton" (CUDA): a flat page list, `pages[page_start[b]:]` for request b, with `seq_lens`; an
  extend also gets `q_start`/`extend_lens` per request and a visibility limit per token
  (`kv_limit`: the token sees keys `[0, kv_limit)`). No mask is built.
Prompts that start at position 0 with nothing bidirectional use SDPA's causal kernel on either
(the Triton context still carries `q_start`/`extend_lens`, no `kv_limit`: MLA's prefill kernel
takes such prompts from their new tokens alone, mla.py).

The device copies are one non-blocking host-to-device copy, so building never waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cluster.engine.kv_cache import pages_for


@dataclass
class AttentionContext:
    num_reqs: int
    max_q_len: int                    # longest extend segment (1 for decode)
    positions: torch.Tensor           # int64 [T]: position of each new token in its request (on the device)
    slot_mapping: torch.Tensor        # int64 [T]: flat cache slot (page * page_size + offset) of each new token
    page_table: Optional[torch.Tensor]   # torch: int64 [B, P] pages per request, padded with page 0
    mask: Optional[torch.Tensor]      # torch decode: additive float [B, 1, L]; extend: bool [B, 1, Lq, L] (True =
                                      # attend), None = causal from position 0 (query j sees keys <= j)
    q_index: Optional[torch.Tensor]   # int64 [B, Lq] token row for each padded query slot; None = rows already [B, Lq]
    out_index: Optional[torch.Tensor] # int64 [T]: padded row of each token, to unpad the output
    is_decode: bool
    kv_index: Optional[torch.Tensor] = None   # [kv_heads * B * P] rows of the flat cache; see gather_kv
    kv_pair_index: Optional[torch.Tensor] = None   # [2 * B * kv_heads * P] K then V rows; see gather_kv_pair
    kv_buffers: Optional[list] = None         # CPU decode gather buffer for K, shared by all layers
    head_mask: Optional[torch.Tensor] = None  # CPU decode: the mask per (KV head, request) pair [kvh * B, 1, L]
    kv_span: Optional[tuple[int, int]] = None # CPU decode of one request on consecutive pages: (first page, seq_len)
    v_token_rows: Optional[torch.Tensor] = None   # [kv_heads * B * G, L] V rows per bag; see _v_token_rows
    backend: str = "torch"                    # "torch" | "triton"
    pages: Optional[torch.Tensor] = None      # triton: int64 flat page list of all requests, in order
    page_start: Optional[torch.Tensor] = None # triton: int64 [B] first entry of each request in `pages`
    seq_lens: Optional[torch.Tensor] = None   # triton: int64 [B] tokens in the cache after this forward
    q_start: Optional[torch.Tensor] = None    # triton extend: int64 [B] first token row of each request
    extend_lens_t: Optional[torch.Tensor] = None   # triton extend: int64 [B]
    kv_limit: Optional[torch.Tensor] = None   # triton extend: int64 [T] keys [0, limit) visible to each token

    @property
    def needs_cache_read(self) -> bool:
        """An extend that sees more than its own new tokens, causally from position 0."""
        return self.mask is not None or self.kv_limit is not None

    @classmethod
    def build(cls, extend_lens: list[int], prefix_lens: list[int], page_tables: list[list[int]],
              bidirectional_lens: list[int], page_size: int, is_decode: bool, device,
              attn_block_sizes: Optional[list[int]] = None,
              dtype: torch.dtype = torch.float32, backend: str = "torch") -> "AttentionContext":
        """`dtype`: the model's; the decode mask is made in it on the CPU (no cast on the device)."""
        num_reqs = len(extend_lens)
        blocky = attn_block_sizes is not None and any(b > 1 for b in attn_block_sizes)
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        is_decode = is_decode or all(e == 1 for e in extend_lens) and not any(bidirectional_lens) and not blocky
        if all(e == 1 for e in extend_lens):
            positions = torch.tensor(prefix_lens, dtype=torch.int64)
        else:
            positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
        if backend == "triton":
            return cls._build_triton(extend_lens, prefix_lens, seq_lens, page_tables, bidirectional_lens,
                                     page_size, is_decode, device, attn_block_sizes if blocky else None, positions)
        num_pages = max(pages_for(s, page_size) for s in seq_lens)
        rows = []
        for i, (pages, s) in enumerate(zip(page_tables, seq_lens)):
            n = pages_for(s, page_size)
            assert len(pages) >= n, f"request {i}: {len(pages)} pages for {s} tokens"
            rows.append(list(pages[:n]) + [0] * (num_pages - n))
        pt = torch.tensor(rows, dtype=torch.int64)
        req_of_token = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(extend_lens))
        slot_mapping = pt[req_of_token, positions // page_size] * page_size + positions % page_size
        kpos = torch.arange(num_pages * page_size)
        seq_t = torch.tensor(seq_lens)
        if is_decode:
            mask = torch.zeros(num_reqs, 1, kpos.numel(), dtype=dtype)
            mask.masked_fill_(kpos[None, None, :] >= seq_t[:, None, None], float("-inf"))
            positions, slot_mapping, pt = to_device(device, positions, slot_mapping, pt)
            return cls(num_reqs, 1, positions, slot_mapping, pt, to_device(device, mask)[0], None, None, True,
                       kv_span=kv_span(rows[0], seq_lens[0], device) if num_reqs == 1 else None)
        max_q = max(extend_lens)
        qj = torch.arange(max_q)
        mask = None   # plain prompts from position 0: SDPA's own causal mask (it skips masked blocks)
        if any(prefix_lens) or any(bidirectional_lens) or blocky:
            qpos = torch.tensor(prefix_lens)[:, None] + qj[None, :]                    # [B, Lq]
            bidi = torch.tensor(bidirectional_lens or [0] * num_reqs)
            bstart = (seq_t - bidi)[:, None, None]
            causal = kpos[None, None, :] <= qpos[:, :, None]
            both_in_block = (qpos[:, :, None] >= bstart) & (kpos[None, None, :] >= bstart)
            # block-causal models (SDAR): a token also sees its whole aligned block
            blk = torch.tensor(attn_block_sizes if blocky else [1] * num_reqs).clamp(min=1)[:, None, None]
            same_block = (kpos[None, None, :] // blk) == (qpos[:, :, None] // blk)
            visible = causal | both_in_block | same_block
            mask = to_device(device, (visible & (kpos[None, None, :] < seq_t[:, None, None]))[:, None])[0]
        if all(e == max_q for e in extend_lens):
            positions, slot_mapping, pt = to_device(device, positions, slot_mapping, pt)
            return cls(num_reqs, max_q, positions, slot_mapping, pt, mask, None, None, False)
        q_index, out_index = _padding(extend_lens, max_q)
        positions, slot_mapping, pt, q_index, out_index = to_device(device, positions, slot_mapping, pt,
                                                                    q_index, out_index)
        return cls(num_reqs, max_q, positions, slot_mapping, pt, mask, q_index, out_index, False)

    @classmethod
    def build_decode(cls, positions: np.ndarray, block_table: np.ndarray, page_size: int, device,
                     dtype: torch.dtype = torch.float32, backend: str = "torch") -> "AttentionContext":
        """One query per request at `positions` (int64 [B]) over its row of `block_table` (int64 [B, P],
        padded): whole-array work in numpy (a few µs per op, where a small torch op costs several)."""
        num_reqs = positions.shape[0]
        seq = positions + 1
        counts = (seq + page_size - 1) // page_size
        width = int(counts.max())
        table = block_table[:, :width]
        keep = np.arange(width)[None, :] < counts[:, None]
        slots = table[np.arange(num_reqs), positions // page_size] * page_size + positions % page_size
        host = torch.from_numpy
        if backend == "triton":
            starts = np.cumsum(counts) - counts
            moved = to_device(device, host(positions), host(slots), host(table[keep]), host(starts), host(seq))
            return cls(num_reqs, 1, moved[0], moved[1], None, None, None, None, True, backend="triton",
                       pages=moved[2], page_start=moved[3], seq_lens=moved[4])
        table = np.where(keep, table, 0)                          # pages past the sequence: page 0, masked
        mask = np.where(np.arange(width * page_size)[None, None, :] >= seq[:, None, None],
                        np.float32(-np.inf), np.float32(0.0))
        positions_t, slots_t, table_t = to_device(device, host(positions), host(slots), host(table))
        return cls(num_reqs, 1, positions_t, slots_t, table_t, to_device(device, host(mask).to(dtype))[0],
                   None, None, True, kv_span=kv_span(table[0], int(seq[0]), device) if num_reqs == 1 else None)

    @classmethod
    def _build_triton(cls, extend_lens, prefix_lens, seq_lens, page_tables, bidirectional_lens, page_size,
                      is_decode, device, block_sizes, positions) -> "AttentionContext":
        num_reqs = len(extend_lens)
        counts = [pages_for(s, page_size) for s in seq_lens]
        for i, (pages, n) in enumerate(zip(page_tables, counts)):
            assert len(pages) >= n, f"request {i}: {len(pages)} pages for {seq_lens[i]} tokens"
        flat = flat_pages(page_tables, counts)
        starts = np.zeros(num_reqs, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        tok_start = np.repeat(starts, extend_lens) if not is_decode else starts
        pos = positions.numpy()
        slots = torch.from_numpy(flat[tok_start + pos // page_size] * page_size + pos % page_size)
        seq_t = torch.tensor(seq_lens, dtype=torch.int64)
        pages_t, page_start = torch.from_numpy(flat), torch.from_numpy(starts)
        if is_decode:
            positions, slots, pages_t, page_start, seq_t = to_device(device, positions, slots, pages_t, page_start,
                                                                     seq_t)
            return cls(num_reqs, 1, positions, slots, None, None, None, None, True, backend="triton",
                       pages=pages_t, page_start=page_start, seq_lens=seq_t)
        max_q = max(extend_lens)
        ext = torch.tensor(extend_lens, dtype=torch.int64)
        q_start = torch.cumsum(ext, 0) - ext
        if not any(prefix_lens) and not any(bidirectional_lens) and block_sizes is None:   # causal from 0
            # SDPA's padded rows, or (MLA's prefill kernel) the rows by q_start; no kv_limit: nothing cached
            q_index, out_index = _padding(extend_lens, max_q) if any(e != max_q for e in extend_lens) else (None, None)
            padding = [t for t in (q_index, out_index) if t is not None]
            moved = to_device(device, positions, slots, q_start, ext, *padding)
            q_index, out_index = (moved[4], moved[5]) if q_index is not None else (None, None)
            return cls(num_reqs, max_q, moved[0], moved[1], None, None, q_index, out_index, False, backend="triton",
                       q_start=moved[2], extend_lens_t=moved[3])
        limit = kv_limits(extend_lens, prefix_lens, seq_lens, bidirectional_lens, block_sizes)
        positions, slots, pages_t, page_start, seq_t, q_start, ext, limit = to_device(
            device, positions, slots, pages_t, page_start, seq_t, q_start, ext, limit)
        return cls(num_reqs, max_q, positions, slots, None, None, None, None, False, backend="triton",
                   pages=pages_t, page_start=page_start, seq_lens=seq_t, q_start=q_start, extend_lens_t=ext,
                   kv_limit=limit)


def kv_span(pages, seq_len: int, device) -> Optional[tuple[int, int]]:
    """(first page, seq_len) when the pages holding `seq_len` tokens are consecutive and on the CPU: decode
    then reads K and V in place (attention.decode_attention). The allocator hands out the lowest free
    pages, so one stream's pages usually are."""
    first = int(pages[0])
    if torch.device(device).type != "cpu" or any(int(p) != first + i for i, p in enumerate(pages)):
        return None
    return first, seq_len


def flat_pages(page_tables: list[list[int]], counts: list[int]) -> np.ndarray:
    """The first `counts[i]` pages of every request, concatenated (int64)."""
    if all(len(t) == n for t, n in zip(page_tables, counts)):
        return np.fromiter((p for t in page_tables for p in t), dtype=np.int64, count=sum(counts))
    return np.fromiter((p for t, n in zip(page_tables, counts) for p in t[:n]), dtype=np.int64, count=sum(counts))


def kv_limits(extend_lens, prefix_lens, seq_lens, bidirectional_lens, block_sizes) -> torch.Tensor:
    """int64 [T]: token j of request i sees keys `[0, limit)`: itself and before (causal); the whole
    sequence when it sits in the trailing bidirectional segment (DLLM); its whole aligned block (SDAR).
    Whole-array numpy (no Python per request: a batch of 64 DLLM blocks builds it every round)."""
    ext = np.asarray(extend_lens, dtype=np.int64)
    req = np.repeat(np.arange(ext.size), ext)
    qpos = np.asarray(prefix_lens, dtype=np.int64)[req] + np.arange(req.size) - np.repeat(np.cumsum(ext) - ext, ext)
    seq = np.asarray(seq_lens, dtype=np.int64)[req]
    limit = qpos + 1
    if bidirectional_lens and any(bidirectional_lens):
        bidi = np.asarray(bidirectional_lens, dtype=np.int64)[req]
        limit = np.where((bidi > 0) & (qpos >= seq - bidi), seq, limit)
    if block_sizes:
        blk = np.maximum(np.asarray(block_sizes, dtype=np.int64)[req], 1)
        limit = np.where(blk > 1, np.maximum(limit, (qpos // blk + 1) * blk), limit)
    return torch.from_numpy(np.minimum(limit, seq))


def _padding(extend_lens: list[int], max_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q_index `[B, Lq]` (pad rows repeat the last token) and out_index `[T]` for ragged extends."""
    starts = torch.cumsum(torch.tensor([0] + extend_lens[:-1]), 0)
    ext = torch.tensor(extend_lens)
    qj = torch.arange(max_q)
    q_index = starts[:, None] + torch.minimum(qj[None, :], ext[:, None] - 1)
    req_of_token = torch.repeat_interleave(torch.arange(len(extend_lens)), ext)
    out_index = req_of_token * max_q + (torch.arange(int(ext.sum())) - starts[req_of_token])
    return q_index, out_index


def to_device(device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """One non-blocking host-to-device copy for tensors of one dtype (a blocking `.to` waits for the
    device to drain; one copy per tensor is one launch each)."""
    if torch.device(device).type == "cpu":
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(device, non_blocking=True)
    return [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
