"""CPU threads: small decode steps (weight matmuls on every torch thread, the small ops between them on
one), and a worker's one OpenMP team (the model loaded off the main thread, forwards on the forward thread)."""
from __future__ import annotations

import pytest
import torch

from cluster.engine import linear as linear_mod
from cluster.engine import model_runner
from cluster.engine.forward_batch import ForwardInput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.runtime.forward_executor import ForwardExecutor
from cluster.runtime.omp_team import load_off_main_thread
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
    monkeypatch.setattr(linear_mod, "_linear", lambda x, w, b=None, residual=None:
                        seen.append(torch.get_num_threads()) or real(x, w, b, residual))
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


def test_load_off_main_thread_returns_the_result_and_leaves_the_main_thread_one_torch_thread(two_threads):
    seen = []
    assert load_off_main_thread(lambda: seen.append(torch.get_num_threads()) or "runner") == "runner"
    assert (seen, torch.get_num_threads()) == ([2], 1)


def test_load_off_main_thread_raises_the_loads_error_on_the_caller(two_threads):
    def fail():
        raise FileNotFoundError("no weights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_off_main_thread(fail)


def test_forward_thread_runs_with_the_executors_cpu_threads_whatever_the_main_thread_has(two_threads):
    torch.set_num_threads(1)
    executor = ForwardExecutor(lambda _: torch.get_num_threads(), threaded=True, cpu_threads=2)
    try:
        assert (executor.submit(1, None).result(timeout=30), torch.get_num_threads()) == (2, 1)
    finally:
        executor.shutdown()
