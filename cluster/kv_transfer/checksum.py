"""Checksums of a request's KV, computed where the bytes are.

Both sides hash the same logical tensor, the handoff layout `[layers, planes, length, kv_heads,
head_dim]`, so the value does not depend on either side's page placement:
- on the CPU: xxh3-64 of its bytes, streamed over the frames or chunks that hold them;
- on a GPU: a position-weighted sum of its 32-bit words mod 2^64 (`fold64`), computed on the
  device, because copying the KV to the host to hash it would cost more than moving it.
Each backend hashes on one kind of device at both ends, so the two never meet.
`shm` reads the pools in place and hashes them in place too (`xxh3_pages`): the same bytes in a
fixed order (per layer, K/V and head: the request's pages' valid slots), without gathering them
into handoff layout first, so its value differs from `xxh3_tensor` of the same KV.
Between TP sizes no process sees every head: each rank hashes its own heads (`head_checksums`,
numbered as the model numbers them) and the request's checksum is xxh3 over the per-head values in
head order (`combine_head_checksums`), however the heads are spread over either side's ranks.
"""
from __future__ import annotations

import struct
from typing import Iterable

import torch
import xxhash

from cluster.engine.kv_cache import pages_for

UINT64 = (1 << 64) - 1
_FOLD_COLS = 4096


def xxh3_chunks(chunks: Iterable[memoryview]) -> int:
    h = xxhash.xxh3_64()
    for c in chunks:
        h.update(c)
    return h.intdigest()


def xxh3_tensor(t: torch.Tensor) -> int:
    t = t.detach().contiguous()
    return xxh3_chunks([memoryview(t.reshape(-1).view(torch.uint8).numpy())])


def fold64(t: torch.Tensor) -> int:
    """Position-weighted sum of the tensor's 32-bit words (16-bit when its size asks), mod 2^64.

    Any changed word changes the sum unless another change cancels it exactly; words that
    trade places change it because every column and row has its own odd weight.
    """
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    word = torch.int32 if flat.numel() % 4 == 0 else torch.int16
    words = flat.view(word).to(torch.int64) if word is torch.int16 else flat.view(word)
    n = words.numel()
    cols = min(_FOLD_COLS, max(1, n))
    rows = (n + cols - 1) // cols
    if rows * cols != n:
        words = torch.nn.functional.pad(words.to(torch.int64), (0, rows * cols - n))
    grid = words.view(rows, cols)
    col_w = torch.arange(cols, device=grid.device, dtype=torch.int64) * 2 + 1
    row_w = torch.arange(rows, device=grid.device, dtype=torch.int64) * 0x9E3779B1 * 2 + 1
    per_row = (grid * col_w.to(grid.dtype)).sum(1, dtype=torch.int64)
    return int((per_row * row_w).sum()) & UINT64


def kv_checksum(t: torch.Tensor) -> int:
    """The checksum of a KV tensor in handoff layout, on whichever device holds it."""
    return xxh3_tensor(t) if t.device.type == "cpu" else fold64(t)


def xxh3_pages(kv: torch.Tensor, pages: list[int], length: int) -> int:
    """xxh3-64 of a request's KV read in place from a CPU pool `[layers, planes, heads, pages, page_size,
    dim]`: for each (layer, plane, head) row, its pages' valid slots in request order, one update
    per run of consecutive pages; the value does not depend on where the pages are."""
    from cluster.kv_transfer.page_copy import page_runs
    page_size, item = kv.shape[4], kv.element_size()
    per_page = page_size * kv.shape[5] * item                                 # bytes
    num = pages_for(length, page_size)
    rows = kv.view(torch.uint8).numpy().reshape(-1, kv.shape[3], per_page)    # one view, sliced in numpy
    runs = page_runs(list(pages[:num]), list(pages[:num]))
    end = (num - 1) * per_page + (length - (num - 1) * page_size) * kv.shape[5] * item
    h = xxhash.xxh3_64()
    for row in rows:
        done = 0
        for start, _, count in runs:
            block = row[start:start + count].reshape(-1)
            block = block[:end - done] if done + block.size > end else block
            done += block.size
            h.update(block)
    return h.intdigest()


def head_checksums(pool, pages: list[int], length: int, first_head: int) -> dict[int, int]:
    """{model KV head: checksum of its slice of a request's KV in handoff layout} for the heads of
    one rank's pool, the first of which is the model's head `first_head`."""
    kv = pool.export_kv(pages, length)
    return {first_head + h: kv_checksum(kv[:, :, :, h]) for h in range(kv.shape[3])}


def combine_head_checksums(sums: dict[int, int], num_kv_heads: int) -> int:
    """A request's checksum from every one of the model's KV heads' (any rank's copy of each)."""
    missing = sorted(set(range(num_kv_heads)) - set(sums))
    if missing:
        raise ValueError(f"no checksum of KV heads {missing}")
    return xxh3_chunks([struct.pack(f"<{num_kv_heads}Q", *(sums[h] for h in range(num_kv_heads)))])
