"""The flat CPU decode loop (cpu_decode.py) against the decoder modules it stands in for: the same
logits bit for bit with float32 weights, on every attention path (one request in place, scattered pages,
several requests); models it does not cover keep the module path. Packed (native) weights' loop:
test_cpu_decode_native.py."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.engine import cpu_decode
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from tests.engine_fixtures import TINY_LLAMA, batch_input, prefill_input

pytestmark = pytest.mark.usefixtures("single_thread")


def _decode_logits(runner: ModelRunner, prompts: list[list[int]], tables: list[list[int]], flat: bool,
                   monkeypatch, num_steps: int = 3) -> torch.Tensor:
    """Prefill each prompt, then `num_steps` decode steps of all of them together: the decode logits."""
    monkeypatch.setattr(cpu_decode, "FLAT_DECODE", flat)
    last = [int(runner.forward(prefill_input(p, t)).next_token_ids[0]) for p, t in zip(prompts, tables)]
    lens, logits = [len(p) for p in prompts], []
    for _ in range(num_steps):
        fi = batch_input([[t] for t in last], lens, tables, is_decode=True)
        fi.return_logits = True
        out = runner.forward(fi)
        logits.append(out.logits)
        last, lens = out.next_token_ids.tolist(), [n + 1 for n in lens]
    return torch.cat(logits)


def _tiny_runner(tmp_path, **config) -> ModelRunner:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, **config}))
    return ModelRunner(load_model("tiny", str(tmp_path), load_format="dummy"), num_pages=32, page_size=4)


LAYOUTS = {   # page tables: one request on consecutive pages (read in place), on scattered pages, three requests
    "one_in_place": [[3, 4, 5, 6]],
    "one_scattered": [[9, 2, 7, 4]],
    "three": [[1, 2, 3, 4], [10, 8, 6, 12], [20, 21, 22, 23]],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [16, 24])   # softmax scale 1/4 (folded into q's rope rows) or not
def test_flat_decode_logits_equal_the_module_path(tmp_path, monkeypatch, layout, head_dim):
    runner = _tiny_runner(tmp_path, head_dim=head_dim)
    tables = LAYOUTS[layout]
    prompts = [[5 + i, 9, 11, 3 + 2 * i, 7][: 3 + i] for i in range(len(tables))]
    flat = _decode_logits(runner, prompts, tables, True, monkeypatch)
    assert runner.model._decode_plan is not None
    assert torch.equal(flat, _decode_logits(runner, prompts, tables, False, monkeypatch))


def test_models_with_q_k_norms_keep_the_module_path(tmp_path, monkeypatch):
    runner = _tiny_runner(tmp_path, architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    _decode_logits(runner, [[5, 9, 11]], [[1, 2]], True, monkeypatch, num_steps=1)
    assert runner.model._decode_plan is None


def test_float64_row_parallel_weights_keep_the_module_path(tmp_path, monkeypatch):
    runner = _tiny_runner(tmp_path)
    _decode_logits(runner, [[5, 9, 11]], [[1, 2]], True, monkeypatch, num_steps=1)
    assert runner.model._decode_plan is not None
    runner.model.set_tp_invariant(True)   # o and down in float64 (tp_invariant): not what the flat loop runs
    _decode_logits(runner, [[5, 9, 11]], [[3, 4]], True, monkeypatch, num_steps=1)
    assert runner.model._decode_plan is None


def test_flat_decode_calls_layer_gates_and_listeners_around_each_layer(tmp_path, monkeypatch):
    runner = _tiny_runner(tmp_path)
    calls = []
    runner.add_layer_gate(lambda i: calls.append(("gate", i)))
    runner.add_layer_listener(lambda i: calls.append(("listener", i)))
    flat = _decode_logits(runner, [[5, 9, 11]], [[1, 2]], True, monkeypatch, num_steps=1)
    assert runner.model._decode_plan is not None
    assert calls[-4:] == [("gate", 0), ("listener", 0), ("gate", 1), ("listener", 1)]
    calls.clear()
    assert torch.equal(flat, _decode_logits(runner, [[5, 9, 11]], [[3, 4]], False, monkeypatch, num_steps=1))
    assert calls[-4:] == [("gate", 0), ("listener", 0), ("gate", 1), ("listener", 1)]
