"""Write-back copies of the host tier: device pages -> host pages, cheap on the scheduler's path.

Host pages are layer-major (`[layers, num_pages, planes, kv_heads, page_size, head_dim]`), so one
run of consecutive host pages is, across all layers, `layers` equal blocks one host layer apart:
one 2-D copy (`cudaMemcpy2DAsync`, rows = layers) per run.

On CUDA (`write_cuda`) nothing waits on the host: a side stream gathers the pages into one
staging block in host layout, the to-host stream carries it to host memory with one 2-D copy per
run, and whatever may write the device pages next waits for the gather on the device: the
caller's stream (the scheduler's own copies; a TP rank's forwards), the streams in `reusers` (a
decode worker's KV imports) and, through `HostTier.flush`, the forward stream. A page is
gathered after what the caller's stream launched so far; the tree's pages are written by no
forward, so nothing in flight elsewhere changes them.

An 8B's write-back of one evicted 64-page prefix (one run of host pages) issued 32 copies and
waited for its gather on the host; now it issues one copy and waits for nothing.
"""
from __future__ import annotations

from typing import Iterable

import torch

from cluster.kv_transfer import cuda_memcpy
from cluster.kv_transfer.page_copy import Copy2D

# cudaMemcpy2D's largest pitch (cudaDevAttrMaxPitch): a host tier whose layer is longer (~32 GB of
# an 8B's pages) takes the per-layer copies; a refused 2-D copy would turn 2-D copies off process-wide
MAX_PITCH = (1 << 31) - 1


def by_host_page(host: list[int], dev: list[int], last_wins: bool = False) -> tuple[list[int], list[int]]:
    """The (host, device) pairs in host page order: a prefix evicted leaf first got its host pages
    in reverse, and sorted they are one run again. `last_wins` (a write-back): a host page named
    twice keeps its last pair, since one eviction may give a host page, take it back (the host
    tier's own eviction) and give it again before the copies run."""
    pairs = sorted(dict(zip(host, dev)).items() if last_wins else zip(host, dev))
    return [h for h, _ in pairs], [d for _, d in pairs]


def runs_of(pages: list[int]) -> list[tuple[int, int, int]]:
    """(index into `pages`, first page, length) of each run of consecutive page ids."""
    out, i = [], 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[j - 1] + 1:
            j += 1
        out.append((i, pages[i], j - i))
        i = j
    return out


def gather(pool_kv: torch.Tensor, device_pages: list[int]) -> torch.Tensor:
    """The pages as one block in host layout `[layers, n, planes, heads, page_size, dim]`: a
    permuted view of the gathered pages, made contiguous on CUDA. NOTE: the index select runs on
    the pool's own layout; on the permuted pool it was 4x slower on the CPU (4 ms a write-back,
    which showed as queue time)."""
    index = torch.tensor(device_pages, dtype=torch.int64)
    if pool_kv.is_cuda:              # NOTE: from pinned memory, so the host does not wait for the stream
        index = index.pin_memory().to(pool_kv.device, non_blocking=True)
    block = pool_kv.index_select(3, index).permute(0, 3, 1, 2, 4, 5)
    return block.contiguous() if block.is_cuda else block


def plan_2d(host_kv: torch.Tensor, block: torch.Tensor, host_runs: list) -> list[Copy2D]:
    """One 2-D copy per run: `layers` rows of the run's pages, one layer apart on each side."""
    esize, page = block.element_size(), block[0, 0].numel()
    src_pitch, dst_pitch = block.stride(0) * esize, host_kv.stride(0) * esize
    return [Copy2D(i * page * esize, first * page * esize, n * page * esize, block.shape[0], src_pitch, dst_pitch)
            for i, first, n in host_runs]


def copy_to_host(host_kv: torch.Tensor, block: torch.Tensor, host_runs: list, stream) -> int:
    """Enqueue the block's runs into the host pages on `stream` (current); -> copies issued."""
    plan = plan_2d(host_kv, block, host_runs)
    if host_kv.is_pinned() and max(plan[0].src_pitch, plan[0].dst_pitch) <= MAX_PITCH:
        with torch.cuda.device(block.device):
            if cuda_memcpy.memcpy_2d(plan, block.data_ptr(), host_kv.data_ptr(), stream.cuda_stream):
                return len(host_runs)
    for layer in range(block.shape[0]):        # the fallback: one copy per layer and run
        for i, first, n in host_runs:
            host_kv[layer, first:first + n].copy_(block[layer, i:i + n], non_blocking=True)
    return block.shape[0] * len(host_runs)


def write_cpu(host_kv: torch.Tensor, pool_kv: torch.Tensor, host_pages: list[int], device_pages: list[int]) -> int:
    """Synchronous write-back; -> copies issued."""
    block = gather(pool_kv, device_pages)
    host_runs = runs_of(host_pages)
    for i, first, n in host_runs:
        host_kv[:, first:first + n].copy_(block[:, i:i + n])
    return len(host_runs)


def write_cuda(tier, host_pages: list[int], device_pages: list[int], reusers: Iterable) -> tuple[object, int]:
    """Gather on `tier.gather_stream`, copy on `tier.to_host_stream` (after the loads already
    issued: a host page is read by its load before it takes other KV), the caller's stream and
    `reusers` waiting for the gather; -> (the gather's event, copies issued). No host wait."""
    device = tier.pool.device
    caller = torch.cuda.current_stream(device)
    tier.gather_stream.wait_stream(caller)
    with torch.cuda.stream(tier.gather_stream):   # NOTE: the index and block are this stream's memory
        block = gather(tier.pool.kv, device_pages)
        gathered = tier.gather_stream.record_event()
    tier.to_host_stream.wait_event(gathered)
    tier.to_host_stream.wait_stream(tier.load_stream)
    with torch.cuda.stream(tier.to_host_stream):
        block.record_stream(tier.to_host_stream)
        copies = copy_to_host(tier.kv, block, runs_of(host_pages), tier.to_host_stream)
    caller.wait_event(gathered)                   # NOTE: the device pages may be taken again from here on
    for stream in reusers:
        stream.wait_event(gathered)
    return gathered, copies
