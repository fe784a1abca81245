"""Fused mixture-of-experts in Triton (CUDA): tokens grouped by expert, one grouped GEMM per projection.

`fused_experts(x, w13, w2, weights, ids)` computes what `moe.Experts.forward` does:

1. Align (`align_by_expert`, torch ops only, no host sync): the (token, slot) pairs sorted by
   expert, each expert's run padded to a multiple of BLOCK_M with a sentinel pair, and per block
   of BLOCK_M pairs the expert it belongs to (-1 past the last touched block). Sizes depend on
   the batch only, so the whole layer can be captured in a CUDA graph.
2. Grouped GEMM (`_grouped_gemm_kernel`): one program per (block of pairs, block of output
   columns) multiplies its pairs' rows by its expert's weight; a program whose block has no
   expert exits at once, so only the experts that got tokens cost anything. Run twice: gate/up
   `[pairs, 2I]` from the token rows, then (after SiLU(gate) * up) down `[pairs, H]` scaled by
   the router weight of each pair.
3. Each token's k pair rows are summed.

Accumulation in float32 (`tl.dot`). Setting TRITON_INTERPRET=1 before this module is imported
runs the kernels on CPU tensors (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK_M = 16
LARGE_TILES = (64, 128, 64)   # (M, N, K) once experts average 32+ pairs: fewer re-reads of each expert's weights
SMALL_TILES = (BLOCK_M, 64, 32)   # decode: a few pairs per expert, little padding


def tiles(num_pairs: int, num_experts: int) -> tuple[int, int, int]:
    return LARGE_TILES if num_pairs >= 32 * num_experts else SMALL_TILES


@triton.jit
def _grouped_gemm_kernel(A, B, C, WEIGHTS, SORTED_PAIRS, BLOCK_EXPERT, num_pairs, N, K,
                         stride_am, stride_be, stride_bn, stride_cm, a_rows_per_pair,
                         MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """C[pair, n] = sum_k A[pair // a_rows_per_pair, k] * B[expert, n, k] (* WEIGHTS[pair])."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert < 0:
        return   # past the last touched expert's blocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(SORTED_PAIRS + offs_m)
    valid = pairs < num_pairs   # padding slots hold the sentinel num_pairs
    rows = (pairs // a_rows_per_pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + expert.to(tl.int64) * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc *= tl.load(WEIGHTS + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """ids `[T, k]` -> (sorted_pairs `[P]`, block_expert `[P // block_m]`): pair p = t * k + slot, runs per
    expert padded to block_m with the sentinel T * k; blocks past the last run have expert -1.
    P = T * k + num_experts * (block_m - 1) rounded up to block_m, a function of the batch only."""
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    capacity = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    # not bincount: on CUDA it reads the max id back to the host, which a CUDA graph cannot capture
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    slot = (run_end - padded)[expert_of] + torch.arange(num_pairs, device=ids.device) - first_of_expert[expert_of]
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int64, device=ids.device)
    sorted_pairs[slot] = order
    block_start = torch.arange(0, capacity, block_m, device=ids.device)
    block_expert = torch.searchsorted(run_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_pairs, block_expert.to(torch.int32)


def _grouped_gemm(a, w, sorted_pairs, block_expert, num_pairs, rows_per_pair, block, weights=None):
    n, k = w.shape[1], w.shape[2]
    out = a.new_empty(num_pairs, n)
    block_m, block_n, block_k = block
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](a, w, out, weights if weights is not None else out, sorted_pairs, block_expert,
                               num_pairs, n, k, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
                               rows_per_pair, MUL_WEIGHT=weights is not None, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """x `[T, H]`, w13 `[E, 2I, H]`, w2 `[E, H, I]`, weights / ids `[T, k]` -> `[T, H]`."""
    t, k = ids.shape
    block = tiles(t * k, w13.shape[0])
    sorted_pairs, block_expert = align_by_expert(ids, w13.shape[0], block[0])
    gate_up = _grouped_gemm(x.contiguous(), w13, sorted_pairs, block_expert, t * k, k, block)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    pair_weights = weights.reshape(-1).to(torch.float32).contiguous()
    down = _grouped_gemm(hidden, w2, sorted_pairs, block_expert, t * k, 1, block, pair_weights)
    return down.view(t, k, -1).sum(dim=1)
