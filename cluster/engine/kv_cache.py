"""KVPool: the paged KV tensors of every layer, and the export/import of one request's KV.

Layout: one tensor `[num_layers, num_planes, num_kv_heads, num_pages, page_size, head_dim]`,
with two planes (K, V) per KV head for multi-head attention, or for latent attention (mla.py)
one plane of one "head" whose row is the token's latent and rope key side by side
(`ModelConfig.kv_cache_shape`). Heads come before pages so gathering a batch's pages yields
`[kv_heads, B, L, D]` already contiguous for attention (see attention.py). The handoff format
is independent of it: `[num_layers, num_planes, length, num_kv_heads, head_dim]`, contiguous,
in the model dtype; every backend moves whatever planes the pool has.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.engine.page_allocator import PageAllocator

__all__ = ["KVPool", "PageAllocator", "pages_for"]


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` positions."""
    return -(-num_tokens // page_size)


class KVPool:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_pages: int, page_size: int,
                 dtype: torch.dtype = torch.float32, device="cpu", storage: torch.Tensor | None = None,
                 num_planes: int = 2):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_pages, self.page_size, self.num_planes = num_pages, page_size, num_planes
        self.dtype, self.device = dtype, torch.device(device)
        shape = (num_layers, num_planes, num_kv_heads, num_pages, page_size, head_dim)
        if storage is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)
        else:   # registered memory (a shared segment for the shm KV transfer)
            if tuple(storage.shape) != shape or storage.dtype != dtype:
                raise ValueError(f"KV storage {tuple(storage.shape)} {storage.dtype} is not {shape} {dtype}")
            self.kv = storage

    def layer_caches(self) -> list[tuple[torch.Tensor, ...]]:
        """Per layer its planes: (K, V), or (latent,)."""
        return [tuple(self.kv[i].unbind(0)) for i in range(self.num_layers)]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def request_bytes(self, length: int) -> int:
        """Bytes of one request's KV in handoff layout."""
        return self.num_layers * self.num_planes * length * self.num_kv_heads * self.head_dim * self.kv.element_size()

    def handoff_shape(self, length: int, num_layers: Optional[int] = None) -> tuple[int, ...]:
        """`[layers, planes, length, kv_heads, head_dim]`: all layers, or `num_layers` of them."""
        layers = self.num_layers if num_layers is None else num_layers
        return layers, self.num_planes, length, self.num_kv_heads, self.head_dim

    def pages_for(self, length: int) -> int:
        return pages_for(length, self.page_size)

    def slots(self, page_table: list[int], length: int) -> torch.Tensor:
        """Flat slot index (page * page_size + offset) of positions 0..length-1."""
        num = self.pages_for(length)
        if len(page_table) < num:
            raise ValueError(f"{len(page_table)} pages cannot hold {length} tokens (page_size {self.page_size})")
        pages = torch.tensor(page_table[:num], dtype=torch.int64)
        pos = torch.arange(length)
        return (pages[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)

    def handoff_rows(self, page_table: list[int], length: int) -> torch.Tensor:
        """Row ids, in handoff order (layer, plane, position, head), of the pool viewed as rows of
        head_dim values: export and import are then one gather / scatter, no permute copy."""
        slots = self.slots(page_table, length)
        lkv = torch.arange(self.num_layers * self.num_planes, device=self.device)[:, None, None]
        heads = torch.arange(self.num_kv_heads, device=self.device)[None, None, :]
        base = (lkv * self.num_kv_heads + heads) * (self.num_pages * self.page_size)
        return (base + slots[None, :, None]).view(-1)

    def export_kv(self, page_table: list[int], length: int) -> torch.Tensor:
        """-> `handoff_shape(length)` contiguous, on the pool's device."""
        rows = self.kv.view(-1, self.head_dim).index_select(0, self.handoff_rows(page_table, length))
        return rows.view(self.handoff_shape(length))

    def import_kv(self, page_table: list[int], kv: torch.Tensor, first_layer: Optional[int] = None) -> None:
        """Write `kv` (handoff layout) into the pages: every layer, or with `first_layer` only
        layers [first_layer, first_layer + kv.shape[0]) (layer-wise streaming)."""
        layers = self.num_layers if first_layer is None else kv.shape[0]
        first = first_layer or 0
        expected = self.handoff_shape(kv.shape[2] if kv.dim() == 5 else -1, layers)
        if kv.dim() != 5 or tuple(kv.shape) != expected or not 0 <= first <= self.num_layers - layers:
            raise ValueError(f"KV tensor of shape {tuple(kv.shape)} at layer {first}, expected {expected} "
                             f"within {self.num_layers} layers")
        rows = self.handoff_rows(page_table, kv.shape[2]).view(self.num_layers, -1)[first:first + layers]
        src = kv.to(device=self.device, dtype=self.dtype).reshape(-1, self.head_dim)
        self.kv.view(-1, self.head_dim).index_copy_(0, rows.reshape(-1), src)
