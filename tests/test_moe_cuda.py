"""The MoE and MLA kernels compiled on CUDA: fused experts equal to the expert loop and capturable in
a CUDA graph (no host sync in routing, alignment or the grouped GEMMs); the MLA decode kernel equal
to gathered latents at DeepSeek-V2-Lite's latent shape. Skipped without CUDA and Triton."""
import importlib.util

import pytest
import torch

from cluster.engine.model_config import ModelConfig, MoeConfig
from cluster.engine.moe import SparseMoe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs CUDA and Triton")


def _layer(dtype, experts=16, top_k=4, hidden=256, inter=128):
    cfg = ModelConfig(vocab_size=16, hidden_size=hidden, intermediate_size=inter, num_layers=1, num_heads=4,
                      num_kv_heads=4, head_dim=64, moe=MoeConfig(experts, top_k, inter, (0,), norm_topk_prob=True,
                                                                num_shared_experts=1))
    g = torch.Generator(device="cuda").manual_seed(0)
    layer = SparseMoe(cfg).cuda().to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.05)
    return layer


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_fused_experts_match_the_loop_on_cuda(dtype, tol, tokens):
    from cluster.engine.moe import route
    from cluster.engine.triton_moe import fused_experts
    layer = _layer(dtype)
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        weights, ids = route(layer.gate(x), layer.moe)
        got = fused_experts(x, layer.experts.gate_up_proj, layer.experts.down_proj, weights, ids)
        want = layer.experts.loop(x, weights, ids)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_sparse_block_replays_from_a_cuda_graph():
    layer = _layer(torch.bfloat16)
    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)   # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out.float(), layer(x).float(), atol=1e-2, rtol=1e-2)
    assert not torch.equal(out, want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_mla_decode_kernel_matches_gathered_latents_on_cuda(dtype, tol):
    from cluster.engine.triton_mla import decode_latent
    rank, rope, page, heads, lens = 512, 64, 16, 16, [1, 70, 300]
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(64, page, rank + rope, generator=g, device="cuda").to(dtype)
    width = max(-(-n // page) for n in lens)
    tables = torch.randperm(64, generator=g, device="cuda")[:len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, rank + rope, generator=g, device="cuda").to(dtype)
    got = decode_latent(q, cache, tables, torch.tensor(lens, device="cuda"), 0.07, rank)
    for b, n in enumerate(lens):
        lat = cache[tables[b]].reshape(-1, rank + rope)[:n].float()
        want = torch.softmax(q[b].float() @ lat.T * 0.07, dim=-1) @ lat[:, :rank]
        torch.testing.assert_close(got[b].float(), want, atol=tol, rtol=tol)
