"""MlaAttention on the Triton context (the decode and prefill kernels under Triton's CPU
interpreter) against the same layer on the torch context (gathered latents, SDPA), at
tiny-deepseek-v2's widths: the layer's output and the latents it writes agree for a decode
step over scattered pages and for extends over cached prefixes beside a prompt with none.
Skipped where Triton is missing and on CUDA (test_moe_cuda.py runs the compiled kernels)."""
import sys

import pytest
import torch

from cluster.engine.attention_context import AttentionContext
from cluster.engine.mla import FRESH_PREFILL_SWITCH, MlaAttention
from cluster.engine.model_config import PRESETS
from cluster.engine.rotary import RotaryEmbedding
from tests.paged_attention_cases import scattered_tables
from tests.triton_interpreter import load_interpreted

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

CFG = PRESETS["tiny-deepseek-v2"]
PAGE, NUM_PAGES = 4, 24
WIDTH = CFG.mla.kv_lora_rank + CFG.mla.qk_rope_head_dim
MODULES = {name: load_interpreted(name) for name in ("triton_mla", "triton_mla_prefill")}


@pytest.fixture
def layer(monkeypatch):
    """The layer, with mla.py's lazy kernel imports answered by the interpreted modules."""
    if any(m is None for m in MODULES.values()):
        pytest.skip("needs triton, not yet imported in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, module in MODULES.items():
        monkeypatch.setitem(sys.modules, f"cluster.engine.{name}", module)
    torch.manual_seed(0)
    return MlaAttention(CFG).eval()


def run_both(layer, extend_lens, prefix_lens):
    """The layer over random cached prefixes, once per backend -> (outputs, caches) per backend."""
    g = torch.Generator().manual_seed(sum(extend_lens) + sum(prefix_lens))
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    tables = scattered_tables(torch.randperm(NUM_PAGES, generator=g).tolist(), seq_lens, PAGE)
    cache = torch.randn(1, 1, NUM_PAGES, PAGE, WIDTH, generator=g)
    x = torch.randn(sum(extend_lens), CFG.hidden_size, generator=g)
    positions = torch.cat([torch.arange(p, s) for p, s in zip(prefix_lens, seq_lens)])
    rope = RotaryEmbedding(CFG.mla.qk_rope_head_dim, 64, CFG.rope_theta).lookup(positions, x.dtype)
    results = {}
    for backend in ("torch", "triton"):
        kv = cache.clone()
        ctx = AttentionContext.build(extend_lens, prefix_lens, tables, [0] * len(tables), PAGE, False, "cpu",
                                     backend=backend)
        with torch.no_grad():
            results[backend] = layer(x, rope, kv, ctx), kv
    return results


@pytest.mark.parametrize("prefix_lens", [[7, 12, 3], [4, 0, 15]])   # the last ends mid-page, then on a boundary
def test_decode_kernel_step_equals_the_torch_path(layer, prefix_lens):
    got = run_both(layer, [1, 1, 1], prefix_lens)
    torch.testing.assert_close(got["triton"][0], got["torch"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got["triton"][1], got["torch"][1])


def test_extend_kernel_over_cached_prefixes_equals_the_torch_path(layer):
    got = run_both(layer, [5, 9, 3], [8, 0, 13])   # a prompt with no prefix rides beside two with one
    torch.testing.assert_close(got["triton"][0], got["torch"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got["triton"][1], got["torch"][1])


@pytest.mark.parametrize("extend_lens", [[6, 40, 1], [9, 9]])   # ragged (40: two query blocks), and even
def test_fresh_prompts_through_the_prefill_kernel_equal_sdpa(layer, extend_lens, monkeypatch):
    """Prompts from position 0: the kernel over the new tokens' latents, causal, as SDPA's causal
    kernel on the torch context (PDCLUSTER_MLA_PREFILL=kernel); by default the Triton context uses SDPA too."""
    monkeypatch.setenv(FRESH_PREFILL_SWITCH, "kernel")
    got = run_both(layer, extend_lens, [0] * len(extend_lens))
    torch.testing.assert_close(got["triton"][0], got["torch"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got["triton"][1], got["torch"][1])
    monkeypatch.setattr(MODULES["triton_mla_prefill"], "extend_expanded", None)   # SDPA must not need it
    monkeypatch.delenv(FRESH_PREFILL_SWITCH)
    torch.testing.assert_close(run_both(layer, extend_lens, [0] * len(extend_lens))["triton"][0], got["torch"][0],
                               atol=1e-6, rtol=1e-6)
