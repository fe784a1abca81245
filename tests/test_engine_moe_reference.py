"""Qwen3-MoE, Mixtral and DeepSeek-V2 (sparse experts; latent attention; with and without YaRN rope
scaling) against transformers: tiny random checkpoints made here, loaded by the engine from their
directories (float32).

Batch-1 decode with top-2 of 4 experts leaves at least two experts without a token in every
sparse layer and step, so the idle-expert path runs throughout.
"""
from __future__ import annotations

import pytest
import torch

from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from tests.engine_fixtures import batch_input
from tests.moe_checkpoints import FAMILIES, save_tiny

PAGE = 4
NUM_NEW = 12
PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 11, 64, 128, 31], [200, 1, 77], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 33, 44, 55, 66, 77]]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(path, request.param)
    runner = ModelRunner(load_model("tiny", path=str(path)), num_pages=64, page_size=PAGE)
    return request.param, ref, runner


def _tables(runner, lens):
    return [runner.page_allocator.allocate(-(-n // PAGE)) for n in lens]


def test_architecture_picks_the_sparse_and_latent_blocks(family):
    name, _, runner = family
    cfg = runner.config
    assert cfg.moe is not None and cfg.moe.num_experts == 4 and cfg.moe.top_k == 2
    assert cfg.moe.sparse_layers == ((0, 1) if name == "mixtral" else (1,))
    is_mla = name.startswith("deepseek_v2")
    assert (cfg.mla is not None) == is_mla
    assert runner.kv_pool.kv.shape[1:3] == ((1, 1) if is_mla else (2, 2))
    assert (cfg.rope_scaling or {}).get("rope_type") == ("yarn" if name.endswith("yarn") else None)


def test_prefill_logits_match_transformers(family):
    _, ref, runner = family
    tables = _tables(runner, [len(p) for p in PROMPTS])
    try:
        fi = batch_input(PROMPTS, [0] * len(PROMPTS), tables)
        fi.return_logits = True
        ours = runner.forward(fi).logits
    finally:
        for t in tables:
            runner.page_allocator.free(t)
    with torch.no_grad():
        want = torch.cat([ref(torch.tensor([p])).logits[0] for p in PROMPTS])
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_extend_over_cached_prefix_matches_transformers(family):
    """The prompt in two forwards: the second reads the first's KV from the pages."""
    _, ref, runner = family
    prompt = PROMPTS[2]
    (table,) = _tables(runner, [len(prompt)])
    try:
        runner.forward(batch_input([prompt[:6]], [0], [table]))
        fi = batch_input([prompt[6:]], [6], [table])
        fi.return_logits = True
        ours = runner.forward(fi).logits
    finally:
        runner.page_allocator.free(table)
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0, 6:]
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_batched_greedy_decode_matches_transformers(family):
    """All prompts prefilled in one batch, then decoded together: tokens equal transformers' greedy
    ones, and every decode step's logits agree with transformers' over the whole sequence."""
    _, ref, runner = family
    tables = _tables(runner, [len(p) + NUM_NEW for p in PROMPTS])
    try:
        out = runner.forward(batch_input(PROMPTS, [0] * len(PROMPTS), tables))
        seqs = [list(p) + [t] for p, t in zip(PROMPTS, out.next_token_ids.tolist())]
        step_logits = []
        for _ in range(NUM_NEW - 1):
            fi = batch_input([[s[-1]] for s in seqs], [len(s) - 1 for s in seqs], tables, is_decode=True)
            fi.return_logits = True
            out = runner.forward(fi)
            step_logits.append(out.logits)
            for s, t in zip(seqs, out.next_token_ids.tolist()):
                s.append(t)
    finally:
        for t in tables:
            runner.page_allocator.free(t)
    for i, (prompt, seq) in enumerate(zip(PROMPTS, seqs)):
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=NUM_NEW, min_new_tokens=NUM_NEW,
                                do_sample=False)[0].tolist()
            full = ref(torch.tensor([seq[:-1]])).logits[0]
        assert seq == want
        decoded = torch.stack([step[i] for step in step_logits])
        torch.testing.assert_close(decoded, full[len(prompt):], atol=1e-4, rtol=1e-4)


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPTNeoXForCausalLM'.*Qwen3MoeForCausalLM"):
        load_model("x", path=str(tmp_path), load_format="dummy")
