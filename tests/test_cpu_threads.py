"""Small CPU decode steps: weight matmuls on every torch thread, the small ops between them on one."""
from __future__ import annotations

import pytest
import torch

from cluster.engine import linear as linear_mod
from cluster.engine import model_runner
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.sampling_params import SamplingParams


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_inside_small_ops_on_one_thread_only_weight_matmuls_get_every_thread(two_threads, monkeypatch):
    seen = []
    real = linear_mod._linear
    monkeypatch.setattr(linear_mod, "_linear", lambda x, w, b=None: seen.append(torch.get_num_threads()) or real(x, w, b))
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with linear_mod.small_ops_on_one_thread():
        inside = torch.get_num_threads()
        out = linear_mod.linear(x, w)
    assert (inside, seen, torch.get_num_threads()) == (1, [2], 2)
    torch.testing.assert_close(out, x @ w.T)


def test_small_decode_step_logits_equal_the_all_threads_step(two_threads, tiny_llama_dir, monkeypatch):
    runner = ModelRunner(load_model("tiny", tiny_llama_dir, load_format="dummy"), num_pages=16, page_size=4)
    pages = runner.page_allocator.allocate(4)
    greedy = SamplingParams(max_tokens=1)

    def step(ids, prefix_len, is_decode):
        return runner.forward(ForwardInput(
            input_ids=torch.tensor(ids), extend_lens=[len(ids)], prefix_lens=[prefix_len], page_tables=[pages],
            sample=[True], sampling=[greedy], is_decode=is_decode, return_logits=True)).logits
    step(list(range(3, 12)), 0, False)
    small = step([5], 9, True)
    monkeypatch.setattr(model_runner, "SMALL_STEP_REQS", 0)
    torch.testing.assert_close(small, step([5], 9, True), rtol=1e-5, atol=1e-5)
