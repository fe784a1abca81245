"""The MLA decode kernel under Triton's CPU interpreter against gathered latents and a float32
softmax: requests of different lengths over scattered pages, more heads than one block, splits
that end past a short request. Skipped where Triton is missing and on CUDA machines."""
import pytest
import torch

from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_mla")
RANK, ROPE, PAGE = 32, 16, 4


def _reference(q, cache, tables, lens, scale):
    out = []
    for b, (table, n) in enumerate(zip(tables, lens)):
        lat = cache[table].reshape(-1, RANK + ROPE)[:n]                  # [n, R + P]
        probs = torch.softmax((q[b] @ lat.T) * scale, dim=-1)
        out.append(probs @ lat[:, :RANK])
    return torch.stack(out)


@pytest.mark.parametrize("heads, lens, splits", [(4, [1, 13, 40], 0), (20, [7, 33], 4), (16, [2, 30], 8)])
def test_interpreted_mla_decode_matches_gathered_latents(kernels, heads, lens, splits):
    g = torch.Generator().manual_seed(heads)
    num_pages = 32
    cache = torch.randn(num_pages, PAGE, RANK + ROPE, generator=g)
    perm = torch.randperm(num_pages, generator=g).tolist()
    width = max(-(-n // PAGE) for n in lens)
    tables, start = [], 0
    for n in lens:
        need = -(-n // PAGE)
        tables.append(perm[start:start + need] + [0] * (width - need))   # padded with page 0, as the torch context
        start += need
    q = torch.randn(len(lens), heads, RANK + ROPE, generator=g)
    flat = torch.tensor([p for t in tables for p in t])                 # the padded table, row by row
    starts = torch.arange(0, len(lens) * width, width)
    got = kernels.decode_latent(q, cache, flat, starts, torch.tensor(lens), 0.125, RANK, num_splits=splits)
    want = _reference(q, cache, [t[:-(-n // PAGE)] for t, n in zip(tables, lens)], lens, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_kernel_supports_only_power_of_two_parts(kernels):
    assert kernels.supports(512, 64) and not kernels.supports(16, 4) and not kernels.supports(48, 16)
