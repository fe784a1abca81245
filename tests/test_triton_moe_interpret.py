"""The fused MoE Triton kernels under Triton's CPU interpreter against the engine's CPU expert loop
(moe.Experts): tokens grouped by expert with padded runs, experts without a token skipped, router
weights applied per pair. Small shapes (the interpreter runs each program in Python); skipped
where Triton is missing and on CUDA machines."""
import pytest
import torch

from cluster.engine.model_config import MoeConfig
from cluster.engine.moe import Experts, route
from tests.triton_interpreter import interpreted_kernels

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines test the compiled kernels")

kernels = interpreted_kernels("triton_moe")


def test_align_groups_pairs_by_expert_in_padded_runs(kernels):
    ids = torch.tensor([[2, 0], [2, 5], [0, 2]])    # experts 1, 3, 4 get nothing
    sorted_pairs, block_expert = kernels.align_by_expert(ids, num_experts=6, block_m=4)
    assert sorted_pairs.numel() == 4 * -(-(6 + 6 * 3) // 4)   # depends on the batch shape only
    assert sorted_pairs[:12].tolist() == [1, 4, 6, 6, 0, 2, 5, 6, 3, 6, 6, 6]   # sentinel 6 pads each run
    assert block_expert.tolist() == [0, 2, 5, -1, -1, -1]


@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter",
                         [(5, 4, 2, 32, 16), (19, 8, 3, 48, 40), (1, 6, 2, 16, 24), (70, 4, 2, 80, 72)])
def test_fused_experts_match_the_cpu_expert_loop(kernels, tokens, experts, top_k, hidden, inter):
    """Small tiles for a few pairs per expert, large ones (the last case) for many."""
    g = torch.Generator().manual_seed(tokens)
    layer = Experts(experts, hidden, inter)
    with torch.no_grad():
        layer.gate_up_proj.copy_(torch.randn(layer.gate_up_proj.shape, generator=g) * 0.2)
        layer.down_proj.copy_(torch.randn(layer.down_proj.shape, generator=g) * 0.2)
    x = torch.randn(tokens, hidden, generator=g)
    moe = MoeConfig(experts, top_k, inter, (0,), norm_topk_prob=True)
    weights, ids = route(torch.randn(tokens, experts, generator=g) * 3, moe)
    with torch.no_grad():
        want = layer(x, weights, ids)
        got = kernels.fused_experts(x, layer.gate_up_proj, layer.down_proj, weights, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
