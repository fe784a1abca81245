"""The 2-D copy plan of `copy_pages` moves exactly the bytes the torch copy moves: checked on
CPU tensors by replaying each planned `cudaMemcpy2D` over the pools' storage bytes, for
whole pools, scattered pages, page/layer/head-sliced views and a non-uniform row layout.
On a CUDA machine the real 2-D memcpy is checked against the torch path too."""
from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from cluster.kv_transfer import cuda_memcpy
from cluster.kv_transfer.page_copy import (Copy2D, copy_2d_plan, copy_pages, copy_runs_2d,
                                           page_runs)

SHAPE = (3, 2, 4, 24, 4, 8)                # layers, K/V, kv heads, pages, page_size, head_dim


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy()


def memcpy_2d(src: torch.Tensor, dst: torch.Tensor, copies: list[Copy2D]) -> None:
    """What cudaMemcpy2D does, on the bytes of CPU tensors (offsets from data_ptr)."""
    sbytes, dbytes = storage_bytes(src), storage_bytes(dst)
    sbase, dbase = src.storage_offset() * src.element_size(), dst.storage_offset() * dst.element_size()
    for c in copies:
        assert c.src_pitch >= c.width and c.dst_pitch >= c.width
        for r in range(c.height):
            s, d = sbase + c.src_offset + r * c.src_pitch, dbase + c.dst_offset + r * c.dst_pitch
            dbytes[d:d + c.width] = sbytes[s:s + c.width]


def pools(seed: int, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def check_plan(src, dst, src_pages, dst_pages, max_copies=None):
    expect = dst.clone()
    expect[:, :, :, dst_pages] = src[:, :, :, src_pages]
    plan = copy_2d_plan(src, dst, page_runs(src_pages, dst_pages))
    assert plan is not None
    if max_copies is not None:
        assert len(plan) <= max_copies
    memcpy_2d(src, dst, plan)
    assert torch.equal(dst, expect)
    return plan


def test_contiguous_run_is_one_2d_copy_of_every_row():
    src, dst = pools(0)
    plan = check_plan(src, dst, list(range(5, 13)), list(range(2, 10)), max_copies=1)
    esize = src.element_size()
    assert plan[0] == Copy2D(5 * 4 * 8 * esize, 2 * 4 * 8 * esize, 8 * 4 * 8 * esize, 3 * 2 * 4,
                             24 * 4 * 8 * esize, 24 * 4 * 8 * esize)


def test_scattered_pages_copy_exactly_one_call_per_run():
    src, dst = pools(1)
    rng = random.Random(1)
    src_pages, dst_pages = rng.sample(range(24), 17), rng.sample(range(24), 17)
    check_plan(src, dst, src_pages, dst_pages, max_copies=len(page_runs(src_pages, dst_pages)))


def test_layer_slice_views_copy_only_their_layers():
    src, dst = pools(2)
    whole_dst = dst.clone()
    for layer in range(SHAPE[0]):
        check_plan(src[layer:layer + 1], dst[layer:layer + 1], [3, 4, 9, 20], [0, 1, 2, 7], max_copies=3)
    whole_dst[:, :, :, [0, 1, 2, 7]] = src[:, :, :, [3, 4, 9, 20]]
    assert torch.equal(dst, whole_dst)
    src, dst = pools(3)
    plan = check_plan(src[1:3], dst[0:2], [6, 7, 8], [10, 11, 12], max_copies=1)
    assert plan[0].height == 2 * 2 * 4


def test_page_sliced_and_bf16_pools_with_different_pitches():
    src, _ = pools(4, dtype=torch.bfloat16)
    dst = torch.zeros((3, 2, 4, 40, 4, 8), dtype=torch.bfloat16)
    check_plan(src[:, :, :, 4:20], dst[:, :, :, 8:], [0, 1, 2, 15], [31, 0, 1, 2], max_copies=3)
    assert torch.count_nonzero(dst[:, :, :, :8]) == 0                    # outside the view: untouched


def test_head_slices_fall_back_to_a_copy_per_layer_and_kv_block():
    src, _ = pools(5)
    dst = torch.zeros((3, 2, 5, 40, 4, 8))                               # other pitches too
    plan = check_plan(src[:, :, 1:3], dst[:, :, 2:4], [1, 2, 5], [7, 8, 0])
    assert len(plan) == 2 * SHAPE[0] * 2 and all(c.height == 2 for c in plan)
    plan = check_plan(src[:, :, 3:4], dst[:, :, 0:1], [1, 2, 5], [7, 8, 0])  # one head: K/V rows step
    assert len(plan) == 2 and all(c.height == SHAPE[0] * 2 for c in plan)


def test_size_one_dims_take_no_step_whatever_their_stride():
    src, dst = pools(10, shape=(2, 2, 1, 24, 4, 8))
    odd = src.as_strided(src.shape, (src.stride(0), src.stride(1), 7, *src.stride()[3:]))
    plan = check_plan(odd, dst, [4, 5], [0, 1], max_copies=1)
    assert plan[0].height == 4 and plan[0].src_pitch == src.stride(1) * src.element_size()


def test_non_uniform_layers_copy_per_layer():
    base_src, _ = pools(6, shape=(3, 3, 4, 24, 4, 8))
    base_dst = torch.zeros((3, 4, 4, 30, 4, 8))
    src, dst = base_src[:, :2], base_dst[:, 1:3]         # stride(0) spans 3 (4) K/V slots, not 2
    plan = check_plan(src, dst, [0, 1, 2, 3], [4, 5, 6, 7])
    assert len(plan) == SHAPE[0] and all(c.height == 2 * 4 for c in plan)


def test_layouts_without_contiguous_pages_have_no_plan():
    src, dst = pools(7)
    assert copy_2d_plan(src.transpose(3, 4), dst.transpose(3, 4), [(0, 0, 1)]) is None
    assert copy_2d_plan(src[..., ::2], dst[..., ::2], [(0, 0, 1)]) is None


def test_copy_pages_rejects_pages_outside_the_pool():
    src, dst = pools(8)
    with pytest.raises(ValueError, match="destination pages"):
        copy_pages(src, dst, [0, 1], [23, 24])
    with pytest.raises(ValueError, match="source pages"):
        copy_pages(src, dst, [-1], [0])


def test_cpu_copy_pages_keeps_the_per_run_copy_for_views():
    src, dst = pools(9)
    expect = dst.clone()
    expect[1:2, :, :, [5, 6, 0]] = src[0:1, :, :, [9, 10, 3]]
    copy_pages(src[0:1], dst[1:2], [9, 10, 3], [5, 6, 0])
    assert torch.equal(dst, expect)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a failing call needs a machine without a GPU")
def test_a_failing_cuda_runtime_turns_the_2d_path_off_once(monkeypatch, caplog):
    monkeypatch.setattr(cuda_memcpy, "_disabled", False)
    monkeypatch.setattr(cuda_memcpy, "_runtime", None)
    copy = Copy2D(0, 0, 16, 1, 16, 16)
    with caplog.at_level(logging.WARNING, logger="pdcluster.kv_transfer"):
        assert not cuda_memcpy.memcpy_2d([copy], 0, 0, 0)          # no runtime, or no device
        assert not cuda_memcpy.memcpy_2d([copy], 0, 0, 0)
    assert len([r for r in caplog.records if "2-D page copies off" in r.getMessage()]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_2d_memcpy_matches_the_torch_copy():
    devices = [torch.device("cuda", i) for i in range(min(2, torch.cuda.device_count()))]
    src = torch.randn((4, 2, 8, 64, 16, 64), device=devices[-1]).to(torch.bfloat16)
    dst = torch.zeros((4, 2, 8, 80, 16, 64), device=devices[0], dtype=torch.bfloat16)
    rng = random.Random(0)
    src_pages, dst_pages = rng.sample(range(64), 40), rng.sample(range(80), 40)
    assert copy_runs_2d(src[1:3], dst[1:3], page_runs(src_pages, dst_pages))
    torch.cuda.synchronize()
    expect = torch.zeros_like(dst)
    expect[1:3, :, :, dst_pages] = src[1:3, :, :, src_pages].to(devices[0])
    assert torch.equal(dst.view(torch.int16), expect.view(torch.int16))
