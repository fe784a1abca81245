"""Copy a request's pages from one KV pool tensor to another of the same layout.

Pools are `[layers, planes, kv_heads, num_pages, page_size, head_dim]` (engine/kv_cache.py: K and V, or one latent plane).
Page pairs are coalesced into runs that are consecutive on both sides. A run is a 2-D copy:
`layers * planes * kv_heads` rows, each `n * page_size * head_dim` contiguous elements, one row
every `stride(2)` elements on each side.

On a GPU, up to `MAX_RUNS` runs, a run is one `cudaMemcpy2DAsync` (cuda_memcpy.py): the copy
engines move it at the link's speed, where a strided `Tensor.copy_` is a TensorIterator kernel
whose SMs read the peer pool more slowly. Past `MAX_RUNS` runs (scattered pages), one gather and
one scatter beat both a 2-D copy and a `copy_` per run, whatever the run size. Measured on
2 x H200 (NVLink), CUDA IPC between two processes, 8B KV shapes in bf16, 2,048 tokens
(benchmarks/page_copy_bench.py, BENCHMARKS.md): contiguous pages, one 2-D copy 0.71 ms
(378 GB/s, a plain copy of the same bytes 0.68 ms) vs a strided `copy_` 0.81 ms; 128 scattered
pages, gather/scatter 1.32 ms vs a 2-D copy per run 1.57 ms vs a `copy_` per run 3.87 ms.
On the CPU the per-run copies stay faster at any count (3.2 vs 0.7 GB/s for 128 single-page
runs here).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from cluster.kv_transfer import cuda_memcpy

MAX_RUNS = 16              # up to this many runs, one copy per run on any path; past it, gather/scatter


class Copy2D(NamedTuple):
    """`height` rows of `width` bytes; byte offsets from each tensor's `data_ptr()`."""
    src_offset: int
    dst_offset: int
    width: int
    height: int
    src_pitch: int
    dst_pitch: int


def page_runs(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """[(src_start, dst_start, num_pages)] covering the pairs in order."""
    runs: list[list[int]] = []
    for s, d in zip(src_pages, dst_pages):
        if runs and s == runs[-1][0] + runs[-1][2] and d == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def _pages_contiguous(t: torch.Tensor) -> bool:
    """Within one (layer, K/V, head) row, consecutive pages are consecutive memory."""
    _, _, _, pages, page_size, head_dim = t.shape
    return ((head_dim == 1 or t.stride(5) == 1) and (page_size == 1 or t.stride(4) == head_dim)
            and (pages == 1 or t.stride(3) == page_size * head_dim))


def _row_pitch(t: torch.Tensor, first_dim: int) -> Optional[int]:
    """Elements between consecutive rows when the rows of dims `first_dim`..2 (layer, K/V,
    head) are uniformly strided; 0 for a single row; None when they are not uniform. Dims
    of size 1 take no step, whatever their stride says."""
    pitch, inner = 0, 1
    for dim in range(2, first_dim - 1, -1):
        if t.shape[dim] > 1:
            if pitch == 0:
                pitch = t.stride(dim)
            elif t.stride(dim) != inner * pitch:
                return None
            inner *= t.shape[dim]
    return pitch


def copy_2d_plan(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]) -> Optional[list[Copy2D]]:
    """The 2-D copies that perform `runs` between two pools of one layout (views welcome: a
    layer slice `kv[a:b]` keeps uniform rows), or None when a side cannot be addressed so.
    Rows uniformly strided on both sides: one copy per run; else one per (run, layer), or per
    (run, layer, K/V), whichever block of rows is still uniform."""
    if not (_pages_contiguous(src) and _pages_contiguous(dst)):
        return None
    layers, kv, heads, _, page_size, head_dim = src.shape
    esize = src.element_size()
    for first_dim, blocks in ((0, [()]), (1, [(l,) for l in range(layers)]),
                              (2, [(l, k) for l in range(layers) for k in range(kv)])):
        pitches = [_row_pitch(t, first_dim) for t in (src, dst)]
        if None not in pitches:
            break
    height = math.prod((layers, kv, heads)[first_dim:])
    copies = []
    for s, d, n in runs:
        width = n * page_size * head_dim * esize
        spitch, dpitch = (p * esize if p else width for p in pitches)
        if spitch < width or dpitch < width:
            return None          # rows would overlap: not a pool layout
        for b in blocks:
            soff = sum(i * src.stride(j) for j, i in enumerate(b)) * esize
            doff = sum(i * dst.stride(j) for j, i in enumerate(b)) * esize
            copies.append(Copy2D(soff + s * src.stride(3) * esize, doff + d * dst.stride(3) * esize,
                                 width, height, spitch, dpitch))
    return copies


def copy_runs_2d(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]) -> bool:
    """Enqueue the runs as 2-D memcpys on dst's current stream; False: not done, copy with torch."""
    plan = copy_2d_plan(src, dst, runs)
    if plan is None:
        return False
    stream = torch.cuda.current_stream(dst.device)
    src_stream = torch.cuda.current_stream(src.device) if src.device != dst.device else None
    if src_stream is not None:          # as Tensor.copy_ across devices: ordered on both sides
        stream.wait_stream(src_stream)
    with torch.cuda.device(dst.device):
        done = cuda_memcpy.memcpy_2d(plan, src.data_ptr(), dst.data_ptr(), stream.cuda_stream)
    if src_stream is not None:
        src_stream.wait_stream(stream)
    return done


def copy_runs_torch(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
    for s, d, n in runs:
        dst[:, :, :, d:d + n].copy_(src[:, :, :, s:s + n], non_blocking=True)


def gather_scatter(src: torch.Tensor, dst: torch.Tensor, src_pages: list[int], dst_pages: list[int]) -> None:
    idx_src = torch.tensor(src_pages, dtype=torch.int64).to(src.device, non_blocking=True)
    idx_dst = torch.tensor(dst_pages, dtype=torch.int64).to(dst.device, non_blocking=True)
    dst.index_copy_(3, idx_dst, src.index_select(3, idx_src).to(dst.device, non_blocking=True))


def copy_pages(src: torch.Tensor, dst: torch.Tensor, src_pages: list[int], dst_pages: list[int]) -> None:
    """dst[:, :, :, dst_pages] = src[:, :, :, src_pages] (pages: dim 3 of both pools).

    Asynchronous on CUDA (dst's current stream). Pools may be views (a layer slice `kv[a:b]`).
    On CUDA: up to MAX_RUNS runs, 2-D memcpys on the copy engines when possible, else the torch
    path; past it one gather and one scatter. On the CPU, one `copy_` per run.
    """
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
    if src.shape[:3] != dst.shape[:3] or src.shape[4:] != dst.shape[4:] or src.dtype != dst.dtype:
        raise ValueError(f"pool layouts differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}")
    for pages, pool, side in ((src_pages, src, "source"), (dst_pages, dst, "destination")):
        if pages and (min(pages) < 0 or max(pages) >= pool.shape[3]):
            raise ValueError(f"{side} pages {min(pages)}..{max(pages)} outside the pool's {pool.shape[3]}")
    runs = page_runs(src_pages, dst_pages)
    if not runs:
        return
    if dst.device.type == "cpu":
        return copy_runs_torch(src, dst, runs)
    if len(runs) > MAX_RUNS:
        return gather_scatter(src, dst, src_pages, dst_pages)
    if src.device.type == "cuda" and copy_runs_2d(src, dst, runs):
        return
    copy_runs_torch(src, dst, runs)
