"""Random paged-attention cases and their reference (torch SDPA on the gathered pages), shared by the
Triton kernel tests on CUDA (test_engine_cuda.py) and under Triton's CPU interpreter."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_case(seed: int, batch: int, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
              max_len: int, dtype, device, max_extend: int = 1):
    """Caches with scattered pages, ragged lengths (some crossing page boundaries), extend segments.
    -> dict of the kernels' inputs plus `tables`, `lens`, `ext` for the reference."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (batch,), generator=g).tolist()
    lens[0] = max(1, (lens[0] // page_size) * page_size + 1) if page_size > 1 else lens[0]   # one token into a page
    ext = [min(n, int(e)) for n, e in zip(lens, torch.randint(1, max_extend + 1, (batch,), generator=g))]
    num_pages = sum(-(-n // page_size) for n in lens) + 3
    tables = scattered_tables(torch.randperm(num_pages, generator=g).tolist(), lens, page_size)
    k_cache = torch.randn(num_kv_heads, num_pages, page_size, head_dim, generator=g).to(device, dtype)
    v_cache = torch.randn(num_kv_heads, num_pages, page_size, head_dim, generator=g).to(device, dtype)
    counts = [len(t) for t in tables]
    page_start = torch.tensor([0] + counts[:-1]).cumsum(0)
    as_dev = lambda xs: torch.as_tensor(xs, dtype=torch.int64).to(device)  # noqa: E731
    return {"k_cache": k_cache, "v_cache": v_cache, "pages": as_dev(sum(tables, [])),
            "page_start": as_dev(page_start), "seq_lens": as_dev(lens), "tables": tables, "lens": lens, "ext": ext,
            "q_dec": torch.randn(batch, num_heads, head_dim, generator=g).to(device, dtype),
            "q_ext": torch.randn(sum(ext), num_heads, head_dim, generator=g).to(device, dtype)}


def scattered_tables(perm: list[int], lens: list[int], page_size: int) -> list[list[int]]:
    """Each length's page table, cut in order from the shuffled page ids `perm`."""
    tables, i = [], 0
    for n in lens:
        k = -(-n // page_size)
        tables.append(perm[i:i + k])
        i += k
    return tables


def gathered(cache: torch.Tensor, pages: list[int], length: int) -> torch.Tensor:
    kvh, _, page_size, d = cache.shape
    return cache[:, pages].reshape(kvh, -1, d)[:, :length]


def reference_decode(case, scale: float) -> torch.Tensor:
    out = []
    for i, n in enumerate(case["lens"]):
        q = case["q_dec"][i][None, :, None].float()
        k = gathered(case["k_cache"], case["tables"][i], n)[None].float()
        v = gathered(case["v_cache"], case["tables"][i], n)[None].float()
        out.append(F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).reshape(1, -1))
    return torch.cat(out)


def extend_limits(case, bidirectional: bool) -> torch.Tensor:
    """Causal limits; with `bidirectional` the last request's whole extend sees its whole sequence."""
    parts = []
    for i, (n, e) in enumerate(zip(case["lens"], case["ext"])):
        pos = torch.arange(n - e, n)
        lim = pos + 1
        if bidirectional and i == len(case["lens"]) - 1:
            lim = torch.full_like(pos, n)
        parts.append(lim)
    return torch.cat(parts)


def reference_extend(case, limits: torch.Tensor, scale: float) -> torch.Tensor:
    out, t0 = [], 0
    for i, (n, e) in enumerate(zip(case["lens"], case["ext"])):
        q = case["q_ext"][t0:t0 + e].transpose(0, 1)[None].float()
        k = gathered(case["k_cache"], case["tables"][i], n)[None].float()
        v = gathered(case["v_cache"], case["tables"][i], n)[None].float()
        mask = torch.arange(n)[None, :] < limits[t0:t0 + e].cpu()[:, None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), scale=scale, enable_gqa=True)
        out.append(o[0].transpose(0, 1).reshape(e, -1))
        t0 += e
    return torch.cat(out)


def extend_args(case, limits: torch.Tensor):
    device = case["k_cache"].device
    ext = torch.tensor(case["ext"], dtype=torch.int64)
    q_start = ext.cumsum(0) - ext
    return (case["q_ext"], case["k_cache"], case["v_cache"], case["pages"], case["page_start"], q_start.to(device),
            ext.to(device), limits.to(device), max(case["ext"]))
