"""The Triton paged-attention kernels under Triton's CPU interpreter (numpy), against SDPA on gathered pages.

Small shapes only (the interpreter runs each program in Python); the CUDA module
(test_engine_cuda.py) runs the same cases compiled, and through the model and CUDA graphs.
Skipped where Triton is not installed, and on CUDA machines (the compiled kernels are tested there).
"""
import pytest
import torch

from tests.paged_attention_cases import (extend_args, extend_limits, make_case, reference_decode,
                                         reference_extend)
from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_attention")


SHAPES = [  # batch, heads, kv heads, head_dim, page_size, max_len
    (3, 8, 2, 16, 4, 40),     # GQA 4, lengths across several pages
    (2, 4, 4, 32, 16, 50),    # no GQA, big pages
    (4, 6, 2, 16, 1, 20),     # GQA 3 (padded to the dot's 16 rows), one token per page
]


@pytest.mark.parametrize("shape", SHAPES)
def test_interpreted_decode_matches_sdpa_on_gathered_pages(kernels, shape):
    b, h, kvh, d, ps, max_len = shape
    case = make_case(7, b, h, kvh, d, ps, max_len, torch.float32, "cpu")
    out = kernels.decode(case["q_dec"], case["k_cache"], case["v_cache"], case["pages"], case["page_start"],
                         case["seq_lens"], 0.25)
    torch.testing.assert_close(out, reference_decode(case, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_interpreted_extend_over_paged_prefix_matches_sdpa(kernels, shape, bidirectional):
    b, h, kvh, d, ps, max_len = shape
    case = make_case(11, b, h, kvh, d, ps, max_len, torch.float32, "cpu", max_extend=9)
    limits = extend_limits(case, bidirectional)
    out = kernels.extend(*extend_args(case, limits), 0.25)
    torch.testing.assert_close(out, reference_extend(case, limits, 0.25), atol=1e-5, rtol=1e-5)
