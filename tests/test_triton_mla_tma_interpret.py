"""The MLA decode kernel's `tma_pages` walk (whole pages through tensor descriptors) under Triton's CPU
interpreter against gathered latents and a float32 softmax: one or several pages a tile, page by page or
in pairs, the latent axis whole or in chunks, page ids read in the loop or ahead, the fused merge in a loop
or unrolled, requests ending mid-page (the rows past the length, NaN here, zeroed), on a page boundary,
empty, split over several splits and head blocks.
Skipped where Triton is missing and on CUDA machines."""
import pytest
import torch

from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_mla")
RANK, ROPE, PAGE = 32, 16, 16


def _case(seed: int, lens: list[int], heads: int, dtype=torch.float32):
    """(q, cache, flat page table, page starts, per-request tables) over shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // PAGE) for n in lens]
    cache = torch.randn(sum(need) + 3, PAGE, RANK + ROPE, generator=g).to(dtype)
    table = torch.randperm(sum(need) + 2, generator=g)[:sum(need)]
    starts = torch.tensor([sum(need[:i]) for i in range(len(lens))])
    q = torch.randn(len(lens), heads, RANK + ROPE, generator=g).to(dtype)
    tables = [table[s:s + k] for s, k in zip(starts.tolist(), need)]
    for t, n in zip(tables, lens):
        if n % PAGE:
            cache[t[-1], n % PAGE:] = float("nan")    # past the request's length: must never reach a dot
    return q, cache, table, starts, tables


def _reference(q, cache, tables, lens, scale):
    out = []
    for b, (table, n) in enumerate(zip(tables, lens)):
        lat = cache[table].reshape(-1, RANK + ROPE)[:n].float()
        probs = torch.softmax((q[b].float() @ lat.T) * scale, dim=-1)
        out.append(probs @ lat[:, :RANK] if n else torch.zeros(q.shape[1], RANK))
    return torch.stack(out)


@pytest.mark.parametrize("block_n, splits, heads, tune", [
    (16, 3, 4, {}),                              # one page a tile
    (32, 3, 4, {}),                              # two pages a tile
    (64, 2, 4, {"fused_merge": True}),           # four pages a tile, the last split merges
    (16, 1, 4, {}),                              # one split: written in place
    (32, 4, 20, {"block_h": 32}),                # 20 heads in one 32-row block, 12 rows masked
    (16, 2, 20, {}),                             # float32: two head blocks of 16
    (32, 0, 4, {"num_stages": 3}),               # the split count from the batch shape
    (16, 3, 4, {"prefetch_pages": True}),        # page ids read a chunk at once into registers
    (64, 2, 20, {"prefetch_pages": True, "fused_merge": True}),
    (16, 3, 4, {"r_chunks": 2}),                 # the latent axis in chunks: 3-D page blocks
    (32, 2, 20, {"r_chunks": 2, "block_h": 32, "prefetch_pages": True, "fused_merge": True}),
    (32, 3, 4, {"page_pairs": True}),            # two pages per softmax step, ids read in the loop
    (64, 2, 20, {"page_pairs": True, "prefetch_pages": True, "fused_merge": True}),   # two pairs a tile
    (32, 2, 4, {"page_pairs": True, "r_chunks": 2, "max_registers": 128}),   # pairs in chunks; the cap
    (16, 3, 4, {"page_pairs": True}),            # one page a tile: page by page
    (32, 3, 20, {"fused_merge": True, "merge_at_once": True}),   # the merge unrolled to 4 splits, 1 masked
    (16, 5, 4, {"fused_merge": True, "merge_at_once": True, "page_pairs": True}),
    (32, 4, 4, {"num_stages": 5, "fused_merge": True, "page_pairs": True, "merge_at_once": True}),   # the table's
    (64, 3, 4, {"num_stages": 3, "fused_merge": True, "page_pairs": True, "merge_at_once": True})])
def test_tma_pages_walk_gives_the_latents_of_the_gathered_softmax(kernels, block_n, splits, heads, tune):
    lens = [30, 96, 1, 0, 47]    # mid-page, on a page boundary, one token, empty (graph padding), partial tile
    q, cache, table, starts, tables = _case(block_n + splits, lens, heads)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, starts, torch.tensor(lens), 0.125,
                                num_splits=splits, block_n=block_n, tma_pages=True, **tune)
    torch.testing.assert_close(got, _reference(q, cache, tables, lens, 0.125), atol=1e-5, rtol=1e-5)


def test_tma_pages_ids_in_registers_across_chunks_of_128_pages(kernels):
    """prefetch_pages reads 128 page ids at a time: one split of 2,100 tokens crosses into a second chunk."""
    lens = [2100, 17]
    q, cache, table, starts, tables = _case(11, lens, 4)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, starts, torch.tensor(lens), 0.125,
                                num_splits=1, block_n=32, tma_pages=True, prefetch_pages=True)
    torch.testing.assert_close(got, _reference(q, cache, tables, lens, 0.125), atol=1e-5, rtol=1e-5)


def test_tma_pages_half_precision_close_to_float32(kernels):
    """float16 stands for bfloat16 (the interpreter's dot cannot multiply raw bfloat16)."""
    lens = [40, 64]
    q, cache, table, starts, tables = _case(7, lens, 16, torch.float16)
    got = kernels.decode_latent(q[..., :RANK], q[..., RANK:], cache, table, starts, torch.tensor(lens), 0.125,
                                num_splits=2, block_n=32, tma_pages=True, fused_merge=True)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), _reference(q, cache, tables, lens, 0.125), atol=2e-2, rtol=2e-2)


def test_descriptors_only_where_pages_are_whole_rows_of_a_tile(kernels):
    """Pages of 16 tokens as rows of one matrix get descriptors; pages too short for a dot, tiles that
    are not whole pages and strided caches take the pointer walk."""
    cache = torch.randn(6, PAGE, RANK + ROPE)
    desc_c, desc_p = kernels._page_descriptors(cache, RANK, ROPE, 32)
    assert desc_c.block_shape == [PAGE, RANK] and desc_p.block_shape == [PAGE, ROPE]
    assert desc_c.shape == [6 * PAGE, RANK + ROPE]
    chunked, _ = kernels._page_descriptors(cache, RANK, ROPE, 32, 2)
    assert chunked.block_shape == [PAGE, 2, RANK // 2] and chunked.strides == [RANK + ROPE, RANK // 2, 1]
    assert kernels._page_descriptors(torch.randn(6, 4, RANK + ROPE), RANK, ROPE, 32) == (None, None)
    assert kernels._page_descriptors(torch.randn(6, 32, RANK + ROPE), RANK, ROPE, 16) == (None, None)
    assert kernels._page_descriptors(torch.randn(6, PAGE, 2 * (RANK + ROPE))[..., :RANK + ROPE], RANK, ROPE,
                                     32) == (None, None)


def test_tma_pages_refuses_the_other_walks():
    from cluster.engine.triton_mla_config import DecodeConfig
    for other in ({"tokens_major": True}, {"reload_q": True}):
        with pytest.raises(AssertionError):
            DecodeConfig(tma_pages=True, **other)
    with pytest.raises(AssertionError):
        DecodeConfig(page_pairs=True)                 # pairs of pages exist in the TMA walk only
    for cap in (8, 256):
        with pytest.raises(AssertionError):
            DecodeConfig(max_registers=cap)
