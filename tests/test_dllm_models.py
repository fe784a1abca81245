"""LLaDA-style and SDAR-style checkpoints written here with upstream names, loaded by the engine
through dllm's layouts, and checked against a plain reference forward with explicit masks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cluster.runtime.cache_manager import CacheManager
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import Req
from dllm.model_spec import DllmModelSpec, detect_spec
from cluster.dllm_params import DllmParams
from dllm.round_manager import DllmReq, RoundManager
from tests.dllm_runs import reqs, run_dllm

V, D, HEADS, KV_HEADS, HD, FF, LAYERS, THETA, EPS = 160, 64, 4, 2, 16, 96, 2, 10000.0, 1e-5
MASK = 150


def rand(*shape, std=0.15, gen):
    return torch.randn(*shape, generator=gen) * std


def norm_weight(n, gen):
    return 1.0 + 0.1 * torch.randn(n, generator=gen)


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llada")
    g = torch.Generator().manual_seed(1)
    t = {"model.transformer.wte.weight": rand(V, D, std=1.0, gen=g),
         "model.transformer.ln_f.weight": norm_weight(D, g),
         "model.transformer.ff_out.weight": rand(V, D, std=0.5, gen=g)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        t |= {p + "q_proj.weight": rand(HEADS * HD, D, gen=g), p + "k_proj.weight": rand(KV_HEADS * HD, D, gen=g),
              p + "v_proj.weight": rand(KV_HEADS * HD, D, gen=g), p + "attn_out.weight": rand(D, HEADS * HD, gen=g),
              p + "ff_proj.weight": rand(FF, D, gen=g), p + "up_proj.weight": rand(FF, D, gen=g),
              p + "ff_out.weight": rand(D, FF, gen=g), p + "attn_norm.weight": norm_weight(D, g),
              p + "ff_norm.weight": norm_weight(D, g)}
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama", "d_model": D,
        "n_heads": HEADS, "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "mlp_hidden_size": FF, "mlp_ratio": 4,
        "vocab_size": V, "embedding_size": V, "rope": True, "rope_theta": THETA, "rms_norm_eps": EPS,
        "layer_norm_type": "rms", "include_bias": False, "include_qkv_bias": False, "weight_tying": False,
        "alibi": False, "max_sequence_length": 512, "mask_token_id": MASK, "eos_token_id": 2,
        "pad_token_id": 2}))
    return str(d)


@pytest.fixture(scope="module")
def sdar_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdar")
    g = torch.Generator().manual_seed(2)
    t = {"model.embed_tokens.weight": rand(V, D, std=1.0, gen=g), "model.norm.weight": norm_weight(D, g),
         "lm_head.weight": rand(V, D, std=0.5, gen=g)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rand(HEADS * HD, D, gen=g),
              p + "self_attn.k_proj.weight": rand(KV_HEADS * HD, D, gen=g),
              p + "self_attn.v_proj.weight": rand(KV_HEADS * HD, D, gen=g),
              p + "self_attn.o_proj.weight": rand(D, HEADS * HD, gen=g),
              p + "self_attn.q_norm.weight": norm_weight(HD, g), p + "self_attn.k_norm.weight": norm_weight(HD, g),
              p + "mlp.gate_proj.weight": rand(FF, D, gen=g), p + "mlp.up_proj.weight": rand(FF, D, gen=g),
              p + "mlp.down_proj.weight": rand(D, FF, gen=g), p + "input_layernorm.weight": norm_weight(D, g),
              p + "post_attention_layernorm.weight": norm_weight(D, g)}
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": V, "hidden_size": D,
        "intermediate_size": FF, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HD, "rms_norm_eps": EPS, "rope_theta": THETA,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "mask_token_id": MASK, "eos_token_id": 2, "bos_token_id": 1}))
    return str(d)


# ---- the reference: a plain full-sequence forward under an explicit mask ------------------------
def weights(path: str) -> dict:
    """Role -> tensor, read straight from the checkpoint with its upstream names."""
    from safetensors.torch import load_file
    t = load_file(f"{path}/model.safetensors")
    if "model.transformer.wte.weight" in t:
        def layer(i):
            p = f"model.transformer.blocks.{i}."
            return {"q": t[p + "q_proj.weight"], "k": t[p + "k_proj.weight"], "v": t[p + "v_proj.weight"],
                    "o": t[p + "attn_out.weight"], "gate": t[p + "ff_proj.weight"], "up": t[p + "up_proj.weight"],
                    "down": t[p + "ff_out.weight"], "ln1": t[p + "attn_norm.weight"], "ln2": t[p + "ff_norm.weight"]}
        return {"emb": t["model.transformer.wte.weight"], "norm": t["model.transformer.ln_f.weight"],
                "head": t["model.transformer.ff_out.weight"], "layers": [layer(i) for i in range(LAYERS)]}

    def layer(i):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        return {"q": t[a + "q_proj.weight"], "k": t[a + "k_proj.weight"], "v": t[a + "v_proj.weight"],
                "o": t[a + "o_proj.weight"], "qn": t[a + "q_norm.weight"], "kn": t[a + "k_norm.weight"],
                "gate": t[p + "mlp.gate_proj.weight"], "up": t[p + "mlp.up_proj.weight"],
                "down": t[p + "mlp.down_proj.weight"], "ln1": t[p + "input_layernorm.weight"],
                "ln2": t[p + "post_attention_layernorm.weight"]}
    return {"emb": t["model.embed_tokens.weight"], "norm": t["model.norm.weight"], "head": t["lm_head.weight"],
            "layers": [layer(i) for i in range(LAYERS)]}


def rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rope(x, pos):
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    ang = torch.cat([pos[:, None] * inv[None, :]] * 2, dim=-1)
    x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.double() * ang.cos()[:, None, :] + rot.double() * ang.sin()[:, None, :]).float()


def reference_logits(w: dict, ids: list[int], mask: torch.Tensor) -> torch.Tensor:
    """ids [T]; mask bool [T, T] (row attends to column) -> logits [T, V]."""
    n = len(ids)
    pos = torch.arange(n, dtype=torch.float64)
    x = w["emb"][torch.tensor(ids)]
    for lw in w["layers"]:
        h = rms(x, lw["ln1"])
        q = (h @ lw["q"].T).view(n, HEADS, HD)
        k = (h @ lw["k"].T).view(n, KV_HEADS, HD)
        v = (h @ lw["v"].T).view(n, KV_HEADS, HD)
        if "qn" in lw:
            q, k = rms(q, lw["qn"]), rms(k, lw["kn"])
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / HD ** 0.5
        att = scores.masked_fill(~mask[None], float("-inf")).softmax(-1)
        x = x + torch.einsum("hqk,khd->qhd", att, v).reshape(n, HEADS * HD) @ lw["o"].T
        h = rms(x, lw["ln2"])
        x = x + (torch.nn.functional.silu(h @ lw["gate"].T) * (h @ lw["up"].T)) @ lw["down"].T
    return rms(x, w["norm"]) @ w["head"].T


def round_mask(n: int, attn_start: int) -> torch.Tensor:
    """What a DLLM round computes: causal, except positions >= attn_start see each other both ways."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (j <= i) | ((i >= attn_start) & (j >= attn_start))


def sdar_mask(n: int, block: int) -> torch.Tensor:
    """SDAR's training mask: a token sees its own aligned block and every earlier one."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return j // block <= i // block


def load_runner(path):
    return ModelRunner(load_model("m", path), num_pages=64, page_size=4)


# ---- loading ------------------------------------------------------------------------------
def test_specs_come_from_config_json(llada_dir, sdar_dir):
    assert detect_spec(llada_dir) == DllmModelSpec.llada(MASK)
    assert detect_spec(sdar_dir) == DllmModelSpec.sdar(MASK)
    assert detect_spec(sdar_dir, mask_token_id=7).mask_token_id == 7
    assert detect_spec("", eos_token_ids=[2]) == DllmModelSpec.causal(2)


@pytest.mark.parametrize("which", ["llada", "sdar"])
def test_fully_bidirectional_forward_matches_reference(which, llada_dir, sdar_dir):
    path = llada_dir if which == "llada" else sdar_dir
    runner = load_runner(path)
    ids = [5, 9, 40, 3, 77, MASK, MASK, 12, MASK]
    fi = ForwardInput(input_ids=torch.tensor(ids), extend_lens=[len(ids)], prefix_lens=[0], page_tables=[[0, 1, 2]],
                      sample=[False], sampling=[SamplingParams()], bidirectional_lens=[len(ids)], return_logits=True)
    got = runner.forward(fi).logits
    want = reference_logits(weights(path), ids, torch.ones(len(ids), len(ids), dtype=torch.bool))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_sdar_single_block_round_is_exactly_sdars_block_causal_mask(sdar_dir):
    """Prompt and answer inside one aligned block: the round's mask is SDAR's own."""
    runner, w = load_runner(sdar_dir), weights(sdar_dir)
    rounds = RoundManager(CacheManager(runner.page_allocator, 4), DllmModelSpec.sdar(MASK), 8, 256, _no_fail)
    prompt = [11, 22, 33]
    state = DllmReq(Req("a", prompt, SamplingParams(max_tokens=5)), DllmParams(block_size=8))
    rounds.add(state)
    got = _round_logits(rounds, runner)
    assert state.block.attn_start == 0 and len(state.block) == 5
    want = reference_logits(w, prompt + [MASK] * 5, sdar_mask(8, 8))[3:]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    rounds.remove("a")
    runner.page_allocator.free(state.req.page_table)


@pytest.mark.parametrize("which", ["llada", "sdar"])
def test_rounds_read_the_prefix_from_the_kv_cache_and_match_reference(which, llada_dir, sdar_dir):
    path = llada_dir if which == "llada" else sdar_dir
    spec = DllmModelSpec.llada(MASK) if which == "llada" else DllmModelSpec.sdar(MASK)
    runner, w = load_runner(path), weights(path)
    rounds = RoundManager(CacheManager(runner.page_allocator, 4), spec, 8, 256, _no_fail)
    prompt = [5, 9, 40, 3, 77, 61]
    state = DllmReq(Req("a", prompt, SamplingParams(max_tokens=8)), DllmParams(block_size=4))
    rounds.add(state)
    seq = list(prompt)

    def check(expected_prefix):
        got = _round_logits(rounds, runner, expected_prefix)   # opens a block when none is active
        block = state.block
        ids = seq + block.input_ids(MASK)
        mask = round_mask(len(ids), block.attn_start)
        if which == "sdar":
            mask = sdar_mask(len(ids), 4)
        want = reference_logits(w, ids, mask)[block.start:]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)

    check(0)                                          # prompt + first block in one forward
    first_start = state.block.attn_start
    assert first_start == (4 if which == "sdar" else 6)
    state.block.tokens[0] = 17                        # a partly filled block: prefix from the cache
    check(first_start)
    state.block.tokens = [17, 18, 19, 20][:len(state.block)]
    seq += state.block.tokens                         # block done: its tokens re-run with the next block
    state.req.output_ids += state.block.tokens
    state.block = None
    check(first_start)
    assert state.req.kv_len == state.block.attn_start
    rounds.remove("a")
    runner.page_allocator.free(state.req.page_table)


@pytest.mark.parametrize("round_tokens", [256, 5])
def test_sdar_rounds_are_exactly_sdars_block_causal_mask_across_blocks(sdar_dir, round_tokens):
    """Prompt blocks and finished blocks attend both ways inside their aligned block, as SDAR's
    generate.py computes them; a prompt chunk (round_tokens 5) ends on a block boundary."""
    runner, w = load_runner(sdar_dir), weights(sdar_dir)
    rounds = RoundManager(CacheManager(runner.page_allocator, 4), DllmModelSpec.sdar(MASK), 8, round_tokens, _no_fail)
    prompt = [5, 9, 40, 3, 77, 61]
    state = DllmReq(Req("a", prompt, SamplingParams(max_tokens=6)), DllmParams(block_size=4))
    rounds.add(state)
    chunked = round_tokens < 8
    got = _round_logits(rounds, runner, chunks=[4] if chunked else [])
    want = reference_logits(w, prompt + [MASK, MASK], sdar_mask(8, 4))[6:]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    state.req.output_ids += [17, 18]
    state.block = None
    got = _round_logits(rounds, runner, expected_prefix=4, chunks=[4] if chunked else [])
    want = reference_logits(w, prompt + [17, 18] + [MASK] * 4, sdar_mask(12, 4))[8:]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    rounds.remove("a")
    runner.page_allocator.free(state.req.page_table)


def _no_fail(req, why):
    raise AssertionError(why)


def _round_logits(rounds, runner, expected_prefix=None, chunks=None):
    """Run rounds until one carries the block (prompt chunks before it) -> its block logits."""
    batches = []
    while not batches or not batches[-1].is_last_chunk[0]:
        batch = rounds.schedule()
        out = runner.forward(rounds.forward_input(batch))
        batch.reqs[0].num_pending = 0
        batches.append(batch)
    if expected_prefix is not None:
        assert batches[0].prefix_lens == [expected_prefix]
    if chunks is not None:
        assert [b.extend_lens[0] for b in batches[:-1]] == chunks
    return rounds.block_logits(batch, out.logits)[0]


# ---- serving ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llada", "sdar"])
@pytest.mark.parametrize("params", [DllmParams(block_size=4, threshold=0.5),
                                    DllmParams(block_size=8, algorithm="fixed_steps", steps_per_block=4)])
def test_checkpoint_serves_through_the_block_loop(which, params, llada_dir, sdar_dir):
    path = llada_dir if which == "llada" else sdar_dir
    runner = load_runner(path)
    spec = detect_spec(path)
    prompts = [[5, 9, 40, 3, 77], [1, 2, 3], [100, 101, 102, 103, 104, 105, 106]]
    control, sched = run_dllm(runner, reqs(prompts=prompts, max_tokens=10, ignore_eos=True), params,
                              overlap=True, spec=spec)
    for out in control.outputs().values():
        assert len(out) == 10 and MASK not in out and all(0 <= t < V for t in out)
    assert sched.heartbeat_gauges().dllm_tokens_per_forward >= 1.0
