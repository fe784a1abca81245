"""The Triton paged-attention kernels under Triton's CPU interpreter (numpy), against SDPA on gathered pages.

Small shapes only (the interpreter runs each program in Python); the CUDA module
(test_engine_cuda.py) runs the same cases compiled, and through the model and CUDA graphs.
Skipped where Triton is not installed, and on CUDA machines (the compiled kernels are tested there).
"""
import importlib.util
import os
import sys

import pytest
import torch

from tests.paged_attention_cases import (extend_args, extend_limits, make_case, reference_decode,
                                         reference_extend)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")


def _load_interpreted():
    """A private copy of cluster/engine/triton_attention.py run by the interpreter. TRITON_INTERPRET must be
    set before triton itself is imported (its library functions are decorated then); None where triton is
    missing or was already imported compiled."""
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return None
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor

        def patched(tensor, scope):   # numpy 2 refuses int() of the 1-element arrays that hold loaded scalars
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched
        path = os.path.join(os.path.dirname(__file__), "..", "cluster", "engine", "triton_attention.py")
        spec = importlib.util.spec_from_file_location("triton_attention_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


KERNELS = _load_interpreted()


@pytest.fixture
def kernels(monkeypatch):
    if KERNELS is None:
        pytest.skip("needs triton, not yet imported in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")   # triton reads it again at launch (lazy imports)
    return KERNELS


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
