"""Tensor parallelism on the CPU (gloo): ranks spawned as processes give the greedy text and the
logits of the unsplit model; a model that cannot split is a ConfigError naming the numbers."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cluster.config_fields import ConfigError
from cluster.config_types import DEFAULT_MODEL
from cluster.engine.llm import LLM
from cluster.engine.model_config import PRESETS
from cluster.engine.parallel import TpLayout
from tests.engine_tp_rank import run_greedy
from tests.test_engine_reference import CHATS, PLAIN

NUM_GREEDY = 16
NUM_GREEDY_BY_MODE = {False: NUM_GREEDY, True: 4}   # tp_invariant's float64 decode steps cost twice as much
NUM_PAGES = 256
RANKS_TIMEOUT_S = 300

pytestmark = pytest.mark.usefixtures("single_thread")


def run_ranks(tmp_path, size: int, model: str, prompts: list, num_tokens: dict[bool, int]) -> dict[bool, list[dict]]:
    """tp_invariant off or on -> each rank's result (tokens, text, KV heads and bytes, logits), from
    `size` rank processes running each mode of `num_tokens` (mode -> greedy tokens) in turn."""
    args = json.dumps({"size": size, "out_dir": str(tmp_path), "model": model, "prompts": prompts,
                       "num_pages": NUM_PAGES, "modes": list(num_tokens.items())})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.engine_tp_rank", str(rank), args], env=env)
             for rank in range(size)]
    try:
        codes = [p.wait(timeout=RANKS_TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert codes == [0] * size
    runs = {}
    for mode in num_tokens:
        runs[mode] = []
        for rank in range(size):
            with open(tmp_path / f"rank{rank}_{mode}.json") as f:
                logits = load_file(str(tmp_path / f"logits{rank}_{mode}.safetensors"))
                runs[mode].append({**json.load(f), "logits": logits})
    return runs


def assert_matches_unsplit(results: list[dict], ref: dict, atol: float = 2e-4, rtol: float = 1e-5) -> None:
    for r in results:   # every rank sampled the same tokens and gathered the same logits
        assert r["tokens"] == ref["tokens"]
        assert r["text"] == ref["text"]
        for key, want in ref["logits"].items():
            torch.testing.assert_close(r["logits"][key], want, atol=atol, rtol=rtol)


@pytest.fixture(scope="module")
def default_model_runs(single_thread, tmp_path_factory):
    """The default model at tp=1 (in process) and tp=3 (three ranks), with tp_invariant off and on:
    {"tp1": {mode: result}, "tp3": {mode: [each rank's result]}}."""
    ref_llm = LLM(num_pages=NUM_PAGES, cpu_weights="float32")   # the ranks dequantize too
    prompts = PLAIN + [ref_llm.tokenizer.apply_chat_template(m) for m in CHATS]
    tp1 = {mode: run_greedy(ref_llm, prompts, n, mode) for mode, n in NUM_GREEDY_BY_MODE.items()}
    del ref_llm
    return {"tp1": tp1, "tp3": run_ranks(tmp_path_factory.mktemp("tp3"), 3, DEFAULT_MODEL, prompts, NUM_GREEDY_BY_MODE)}


def test_default_model_at_tp3_gives_the_reference_greedy_text_and_logits(default_model_runs):
    """9 heads, 3 KV heads, intermediate 1536, vocabulary 49152: tp=3 divides them all."""
    ref, results = default_model_runs["tp1"][False], default_model_runs["tp3"][False]
    # float32 sums at both sizes round differently, and the model amplifies that to 1.5-1.6e-4 (tp=1
    # itself moves by 9e-5 with the batch around a prompt): the reference test's 2e-4 bound, not
    # 1e-4; tp_invariant (the next test) meets 1e-4, bitwise equal in BENCHMARKS.md
    assert_matches_unsplit(results, ref, atol=2e-4)
    for r in results:   # each rank's pool holds its one KV head of three
        assert r["kv_heads"] == 1 and r["kv_bytes"] * 3 == ref["kv_bytes"]


def test_tp_invariant_default_model_at_tp3_gives_tp1_logits_within_1e4_and_the_reference_text(default_model_runs):
    """With the row-parallel sums in float64 on both sides, tp=3 and tp=1 round the same sums."""
    ref, results = default_model_runs["tp1"][True], default_model_runs["tp3"][True]
    assert_matches_unsplit(results, ref, atol=1e-4, rtol=0)
    reference = default_model_runs["tp1"][False]["tokens"]
    assert ref["tokens"] == [t[:len(ref["tokens"][0])] for t in reference]   # the reference greedy text


@pytest.mark.parametrize("model,tp,kv_heads", [
    ("tiny-llama", 4, 1),          # 4 heads, 2 KV heads: each KV head replicated on two ranks
    ("tiny-qwen3-moe", 2, 1),      # one KV head per rank; sparse blocks replicated, q/k norms per head
    ("tiny-deepseek-v2", 2, 1),    # latent attention replicated: one latent "head" on every rank
])
def test_tiny_models_split_over_ranks_match_unsplit(tmp_path, model, tp, kv_heads):
    prompts = [[5, 17, 300, 4000, 12], [7, 7, 7, 49151, 2000, 31, 8, 9, 10]]
    ref = run_greedy(LLM(model=model, num_pages=NUM_PAGES), prompts, 6)
    results = run_ranks(tmp_path, tp, model, prompts, {False: 6})[False]
    assert_matches_unsplit(results, ref)
    assert [r["kv_heads"] for r in results] == [kv_heads] * tp


def test_kv_heads_replicated_when_fewer_than_ranks_pick_the_heads_their_queries_read():
    cfg = PRESETS["tiny-llama"]   # 4 heads, 2 KV heads
    assert [TpLayout(cfg, 4, r).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert [TpLayout(cfg, 2, r).kv_head_start for r in range(2)] == [0, 1]


def test_vocabulary_not_divisible_is_padded_on_the_last_rank():
    cfg = dataclasses.replace(PRESETS["tiny-llama"], vocab_size=49151)
    layout = TpLayout(cfg, 2, 1)
    shard = layout.shard("embed_tokens.weight", torch.ones(49151, 64))
    assert shard.shape == (24576, 64) and float(shard[-1].abs().sum()) == 0.0


@pytest.mark.parametrize("change,tp,numbers", [
    ({}, 2, "num_heads 9"),                                    # the default model's heads
    ({"num_heads": 12, "num_kv_heads": 6}, 4, "num_kv_heads 6"),
    ({"num_heads": 12, "num_kv_heads": 3, "intermediate_size": 1537}, 3, "intermediate_size 1537"),
])
def test_model_that_does_not_split_is_a_config_error_naming_the_numbers(change, tp, numbers):
    cfg = dataclasses.replace(PRESETS["tiny-llama"], num_heads=9, num_kv_heads=3, intermediate_size=1536)
    with pytest.raises(ConfigError, match=f"{numbers}.*tp={tp}|tp={tp}.*{numbers}"):
        TpLayout(dataclasses.replace(cfg, **change), tp, 0)


def test_a_rank_reads_only_its_shard_and_gets_the_slices_of_the_full_load(tmp_path):
    """`load_hf_shards` over lazily read tensors (one full parameter at a time) gives each rank exactly
    what cutting the fully loaded model gives it."""
    from safetensors.torch import save_file

    from cluster.engine.lazy_tensors import LazyTensors
    from cluster.engine.loader import _build, _shard
    from cluster.engine.model import LlamaModel
    from cluster.engine.parallel import TpGroup
    cfg = dataclasses.replace(PRESETS["tiny-llama"], vocab_size=510, max_position_embeddings=64)   # 510: padded rows
    torch.manual_seed(0)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (cfg.q_size, cfg.hidden_size),
                   p + "self_attn.k_proj.weight": (cfg.kv_size, cfg.hidden_size),
                   p + "self_attn.v_proj.weight": (cfg.kv_size, cfg.hidden_size),
                   p + "self_attn.o_proj.weight": (cfg.hidden_size, cfg.q_size),
                   p + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   p + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   p + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
                   p + "input_layernorm.weight": (cfg.hidden_size,), p + "post_attention_layernorm.weight": (cfg.hidden_size,)}
    tensors = {n: torch.randn(s) for n, s in shapes.items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    full = _build(cfg, torch.float32, "cpu")
    full.load_hf_weights(tensors)
    with torch.device("meta"):
        meta = LlamaModel(cfg)
    for rank in range(4):
        tp = TpGroup(rank, 4)
        want = dict(_shard(full, cfg, torch.float32, "cpu", tp).named_parameters())
        got = _build(cfg, torch.float32, "cpu", tp)
        got.load_hf_shards(meta, LazyTensors([str(tmp_path / "model.safetensors")]))
        for name, p in got.named_parameters():
            assert torch.equal(p, want[name]), (rank, name)


def test_tp_invariant_with_packed_cpu_weights_is_a_config_error_naming_the_fix():
    with pytest.raises(ConfigError, match='cpu_weights = "float32"'):
        LLM(tp_invariant=True)   # cpu_weights "native" by default: int4/int8 kernels, no float64 sums
