"""The MoE and MLA kernels compiled on CUDA: fused experts equal to the expert loop and capturable in
a CUDA graph (no host sync in routing, alignment or the grouped GEMMs); the MLA decode kernel equal
to gathered latents at DeepSeek-V2-Lite's latent shape. Skipped without CUDA and Triton."""
import importlib.util

import pytest
import torch

from cluster.engine.model_config import ModelConfig, MoeConfig
from cluster.engine.moe import SparseMoe
from cluster.engine.triton_mla_config import PAGE_PAIRS_16

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


def _check_mla_decode(dtype, tol, heads, splits, tune, lens=(1, 70, 300, 0)):
    from cluster.engine.triton_mla import decode_latent
    rank, rope, page, lens = 512, 64, 16, list(lens)
    g = torch.Generator(device="cuda").manual_seed(0)
    width = max(-(-n // page) for n in lens)
    pool = max(96, len(lens) * width)
    cache = torch.randn(pool, page, rank + rope, generator=g, device="cuda").to(dtype)
    tables = torch.randperm(pool, generator=g, device="cuda")[:len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, rank + rope, generator=g, device="cuda").to(dtype)
    got = decode_latent(q[..., :rank], q[..., rank:], cache, tables.reshape(-1),
                        torch.arange(0, len(lens) * width, width, device="cuda"), torch.tensor(lens, device="cuda"), 0.07,
                        num_splits=splits, **tune)
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))     # a graph's padding row: no tokens, zeros
    if tune.get("fused_merge"):                                # the counters are ready for the next launch
        from cluster.engine.triton_mla import _merge_counters
        assert not _merge_counters(cache.device).any()
    for b, n in enumerate(lens[:-1]):
        lat = cache[tables[b]].reshape(-1, rank + rope)[:n].float()
        want = torch.softmax(q[b].float() @ lat.T * 0.07, dim=-1) @ lat[:, :rank]
        torch.testing.assert_close(got[b].float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads", [16, 128])       # DeepSeek-V2-Lite's one head block; V3's two of 64
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("splits, tune", [
    (0, {}), (1, {}), (5, {}), (5, {"fused_merge": False}), (0, {"tokens_major": True, "block_n": 32, "num_stages": 2}),
    (3, {"tokens_major": True, "block_n": 32, "num_stages": 1}), (0, {"reload_q": True}),
    (4, {"fused_merge": True})])                   # (0: the table's split count and config)
def test_mla_decode_kernel_matches_gathered_latents_on_cuda(dtype, tol, heads, splits, tune):
    _check_mla_decode(dtype, tol, heads, splits, tune)


@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("splits, tune", [
    (0, {"page_rows": True}), (5, {"prefetch_pages": True}), (3, {"float32_partials": True}),
    (4, {"prefetch_pages": True, "page_rows": True, "fused_merge": True, "num_stages": 3}),
    (0, {"block_n": 16, "num_stages": 4, "prefetch_pages": True}), (2, {"block_n": 64, "num_warps": 8}),
    (0, {"block_h": 16, "num_warps": 4, "fused_merge": True}), (4, {"r_chunks": 4, "num_warps": 4}),
    (6, {"r_chunks": 8, "num_warps": 8, "fused_merge": True, "prefetch_pages": True}),
    (3, {"r_chunks": 4, "num_warps": 4, "block_h": 32, "fused_merge": True}),
    (0, {"tma_pages": True, "fused_merge": True, "num_stages": 3}),
    (4, {"tma_pages": True, "block_n": 16, "num_stages": 4}),
    (0, {"tma_pages": True, "block_n": 64, "block_h": 64, "num_warps": 8, "fused_merge": True}),
    (5, {"tma_pages": True, "prefetch_pages": True, "block_n": 16, "num_stages": 5, "fused_merge": True}),
    (3, {"tma_pages": True, "prefetch_pages": True, "block_n": 32, "num_stages": 3}),
    (0, {"block_n": 16, "num_stages": 7, "fused_merge": True}),
    (4, {"tma_pages": True, "prefetch_pages": True, "block_n": 16, "num_stages": 5, "r_chunks": 4, "num_warps": 4,
         "fused_merge": True}),
    (2, {"tma_pages": True, "prefetch_pages": True, "block_n": 16, "num_stages": 5, "r_chunks": 8, "num_warps": 8,
         "block_h": 32}),
    (4, {"tma_pages": True, "page_pairs": True, "block_n": 32, "num_stages": 5, "fused_merge": True}),
    (3, {"tma_pages": True, "page_pairs": True, "prefetch_pages": True, "block_n": 64, "num_stages": 3}),
    (4, {"tma_pages": True, "block_n": 16, "num_stages": 7, "r_chunks": 8, "num_warps": 8, "max_registers": 128,
         "block_h": 16, "fused_merge": True}),
    (6, {"tma_pages": True, "block_n": 16, "num_stages": 5, "r_chunks": 4, "num_warps": 4, "max_registers": 168,
         "block_h": 16, "fused_merge": True})])
def test_mla_decode_sweep_variants_match_gathered_latents_in_bfloat16(heads, splits, tune):
    """The sweep's variants (mla_decode_sweep.py) in bfloat16, what runs them: page ids per page or two
    tiles ahead, deeper pipelines, other tiles, warps and head blocks, the latent axis over warps, whole
    pages through tensor descriptors (TMA), page by page or in pairs, registers capped."""
    _check_mla_decode(torch.bfloat16, 2e-2, heads, splits, tune)


@pytest.mark.parametrize("splits", [0, 1, 3, 4, 6])
@pytest.mark.parametrize("tune", [
    {},                                         # the table's row (16 heads: 16-token tiles, 7 stages)
    {"config": PAGE_PAIRS_16},                  # the row once these pass on a GPU (triton_mla_config.py)
    {"tma_pages": True, "page_pairs": True, "block_n": 64, "num_stages": 3, "fused_merge": True, "merge_at_once": True},
    {"tma_pages": True, "page_pairs": True, "prefetch_pages": True, "block_n": 64, "num_stages": 2,
     "fused_merge": True, "merge_at_once": True},
    {"tma_pages": True, "prefetch_pages": True, "block_n": 16, "num_stages": 4, "fused_merge": True,
     "merge_at_once": True}])
def test_mla_decode_page_pairs_at_tile_and_split_edges(splits, tune):
    """DeepSeek-V2-Lite's 16 heads: the table's row and the quick sweep's page-pair variants in bfloat16 at
    lengths on and beside page, tile and pair edges (a lone page, an odd page count, a partial page after
    whole tiles, a full 2,048-token request), split counts that are and are not a power of two
    (merge_at_once pads to one)."""
    _check_mla_decode(torch.bfloat16, 2e-2, 16, splits, tune,
                      lens=(16, 17, 32, 48, 63, 64, 65, 96, 130, 2047, 2048, 0))


def test_mla_fused_merge_equals_the_merge_kernel_launch_after_launch():
    """The last split merges once all of its block's partials are visible: many launches at DeepSeek-V2-Lite's
    decode shape (batch 64, lengths up to 2,048), each with new queries (a stale partial would be the last
    launch's), give the separate merge kernel's latents every time."""
    from cluster.engine.triton_mla import decode_latent
    rank, rope, page, b = 512, 64, 16, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    lens = torch.randint(1, 2049, (b,), generator=g, device="cuda")
    cache = torch.randn(b * 128, page, rank + rope, generator=g, device="cuda").to(torch.bfloat16)
    pages = torch.randperm(b * 128, generator=g, device="cuda")
    starts = torch.arange(0, b * 128, 128, device="cuda")
    for _ in range(30):
        q = torch.randn(b, 16, rank + rope, generator=g, device="cuda").to(torch.bfloat16)
        want = decode_latent(q[..., :rank], q[..., rank:], cache, pages, starts, lens, 0.07, num_splits=8,
                             fused_merge=False)
        got = decode_latent(q[..., :rank], q[..., rank:], cache, pages, starts, lens, 0.07, num_splits=8,
                            fused_merge=True)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("tune", [{}, {"r_chunks": 4, "num_warps": 4, "fused_merge": True, "num_splits": 6},
                                  {"prefetch_pages": True, "page_rows": True, "fused_merge": True, "num_splits": 5},
                                  {"tma_pages": True, "prefetch_pages": True, "block_n": 16, "num_stages": 5,
                                   "fused_merge": True, "num_splits": 4}])
def test_mla_decode_table_config_replays_from_a_cuda_graph(tune):
    """The table's configuration for bfloat16 16 heads (the fused merge: arrival counters reset by
    the merging program) and sweep candidates (tma_pages: its descriptors are kernel parameters, captured
    by value), captured once at DeepSeek-V2-Lite's latent shape
    and replayed with new queries, equal eager launches with the separate merge kernel."""
    from cluster.engine.triton_mla import decode_latent
    rank, rope, page, b = 512, 64, 16, 8
    g = torch.Generator(device="cuda").manual_seed(4)
    lens = torch.randint(1, 1025, (b,), generator=g, device="cuda")
    cache = torch.randn(b * 64, page, rank + rope, generator=g, device="cuda").to(torch.bfloat16)
    pages, starts = torch.randperm(b * 64, generator=g, device="cuda"), torch.arange(0, b * 64, 64, device="cuda")
    q = torch.randn(b, 16, rank + rope, generator=g, device="cuda").to(torch.bfloat16)
    run = lambda: decode_latent(q[..., :rank], q[..., rank:], cache, pages, starts, lens, 0.07, **tune)  # noqa: E731
    run()                                                     # compiles and allocates outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run()
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=g, device="cuda"))
        graph.replay()
        want = decode_latent(q[..., :rank], q[..., rank:], cache, pages, starts, lens, 0.07, num_splits=tune.get(
            "num_splits", 0), fused_merge=False)
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe"])
def test_moe_and_mla_models_decode_the_same_from_cuda_graphs_and_eagerly(preset, monkeypatch):
    """Decode steps replayed from CUDA graphs (fused MoE, MLA kernel on the graph's flat page list)
    give the tokens of eager steps."""
    from cluster.engine.loader import load_model
    from cluster.engine.model_runner import ModelRunner
    from tests.engine_fixtures import batch_input
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(40, 61))]

    def greedy(graphs: bool) -> list[list[int]]:
        monkeypatch.setenv("PDCLUSTER_CUDA_GRAPHS", "1" if graphs else "0")
        runner = ModelRunner(load_model(preset, path=preset, load_format="dummy", device="cuda"), num_pages=64,
                             page_size=16, device="cuda", max_decode_batch=4)
        assert (runner.decode_graphs is not None) == graphs
        tables = [runner.page_allocator.allocate(2) for _ in prompts]
        out = runner.forward(batch_input(prompts, [0] * 3, tables)).next_token_ids.tolist()
        seqs = [p + [t] for p, t in zip(prompts, out)]
        for _ in range(8):
            fi = batch_input([[s[-1]] for s in seqs], [len(s) - 1 for s in seqs], tables, is_decode=True)
            for s, t in zip(seqs, runner.forward(fi).next_token_ids.tolist()):
                s.append(t)
        return seqs

    assert greedy(True) == greedy(False)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_mla_extend_kernel_matches_expanded_attention_on_cuda(dtype, tol):
    """DeepSeek-V2-Lite's widths (latent 512 + rope 64, nope 128, value 128, 16 heads), two requests
    extending cached prefixes causally, one across several query blocks."""
    from cluster.engine.attention_context import AttentionContext
    from cluster.engine.triton_mla_prefill import extend_expanded
    rank, rope, nope, v, heads, page = 512, 64, 128, 128, 16, 16
    extend_lens, prefix_lens = [150, 7], [40, 300]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    g = torch.Generator(device="cuda").manual_seed(1)
    perm = torch.randperm(64, generator=g, device="cuda").tolist()
    counts = [-(-s // page) for s in seq_lens]
    tables = [perm[:counts[0]], perm[counts[0]:counts[0] + counts[1]]]
    cache = torch.randn(64, page, rank + rope, generator=g, device="cuda").to(dtype)
    w_kv = (torch.randn(heads * (nope + v), rank, generator=g, device="cuda") * 0.05).to(dtype)
    q = torch.randn(sum(extend_lens), heads, nope + rope, generator=g, device="cuda").to(dtype)
    ctx = AttentionContext.build(extend_lens, prefix_lens, tables, [0, 0], page, False, "cuda", backend="triton")
    latents = cache.index_select(0, ctx.pages).view(-1, rank + rope)
    kv = (latents[:, :rank] @ w_kv.T).view(latents.shape[0], heads, nope + v)
    got = extend_expanded(q[..., :nope], q[..., nope:], kv, latents[:, rank:], ctx.page_start, ctx.q_start,
                          ctx.extend_lens_t, ctx.kv_limit, ctx.max_q_len, page, 0.07)
    row = 0
    for table, e, p, s in zip(tables, extend_lens, prefix_lens, seq_lens):
        lat = cache[table].reshape(-1, rank + rope)[:s].float()
        full = (lat[:, :rank] @ w_kv.float().T).view(s, heads, nope + v)
        keys = torch.cat((full[..., :nope], lat[:, None, rank:].expand(s, heads, rope)), -1)
        scores = torch.einsum("ehd,shd->hes", q[row:row + e].float(), keys) * 0.07
        causal = torch.arange(s, device="cuda")[None, :] <= torch.arange(p, s, device="cuda")[:, None]
        want = torch.einsum("hes,shd->ehd", torch.softmax(scores.masked_fill(~causal, float("-inf")), -1),
                            full[..., nope:])
        torch.testing.assert_close(got[row:row + e].float(), want, atol=tol, rtol=tol)
        row += e


def test_mla_model_extends_a_cached_prefix_as_the_torch_path_does(monkeypatch):
    """tiny-deepseek-v2 on the Triton context (the prefill kernel over the first chunk's new tokens,
    opted in, then over pages; the decode kernel) gives the greedy tokens of the torch context with
    gathered latents, for prompts computed in two chunks."""
    from cluster.engine.loader import load_model
    from cluster.engine.model_runner import ModelRunner
    from tests.engine_fixtures import batch_input
    prompts = [list(range(40, 77)), list(range(100, 125))]

    monkeypatch.setenv("PDCLUSTER_MLA_PREFILL", "kernel")

    def greedy(switch: str) -> list[list[int]]:
        monkeypatch.setenv("PDCLUSTER_MLA", switch)
        runner = ModelRunner(load_model("tiny-deepseek-v2", path="tiny-deepseek-v2", load_format="dummy",
                                        device="cuda"), num_pages=64, page_size=16, device="cuda", max_decode_batch=4)
        assert runner.attention_backend == ("torch" if switch == "torch" else "triton")
        tables = [runner.page_allocator.allocate(4) for _ in prompts]
        runner.forward(batch_input([p[:20] for p in prompts], [0, 0], tables))        # the first chunk
        out = runner.forward(batch_input([p[20:] for p in prompts], [20, 20], tables)).next_token_ids
        seqs = [p + [t] for p, t in zip(prompts, out.tolist())]
        for _ in range(4):
            fi = batch_input([[s[-1]] for s in seqs], [len(s) - 1 for s in seqs], tables, is_decode=True)
            for s, t in zip(seqs, runner.forward(fi).next_token_ids.tolist()):
                s.append(t)
        return seqs

    assert greedy("triton") == greedy("torch")
