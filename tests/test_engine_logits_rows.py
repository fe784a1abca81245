"""`ForwardInput.logits_lens`: the engine returns (and projects) only each request's last rows."""
from __future__ import annotations


import pytest
import torch

from cluster.engine.forward_batch import ForwardInput
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from tests.engine_fixtures import GREEDY, TINY_VOCAB

CHUNKS = [[5, 17, 33, 101, 7], [9, 250, 3, 77, 44, 12, 8, 91, 60], [300, 301], [40, 41, 42, 43, 44, 45, 46]]
PREFIX_LENS = [0, 3, 0, 6]   # two requests extend a cached prefix

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runner(tiny_llama_dir):
    return ModelRunner(load_model("tiny", tiny_llama_dir, load_format="dummy"), num_pages=64, page_size=4)


def _mixed_input(logits_lens: list[int], sample: bool = False) -> ForwardInput:
    """Four requests, extend lens 5/9/2/7, two after a cached prefix (whatever KV their pages hold:
    every forward here reads the same), two with bidirectional tails."""
    pages = [list(range(4 * i, 4 * i + 4)) for i in range(len(CHUNKS))]
    n = len(CHUNKS)
    return ForwardInput(input_ids=torch.tensor([t for c in CHUNKS for t in c]), extend_lens=[len(c) for c in CHUNKS],
                        prefix_lens=list(PREFIX_LENS), page_tables=pages, sample=[sample] * n, sampling=[GREEDY] * n,
                        bidirectional_lens=[0, 2, 0, 3], return_logits=True, logits_lens=logits_lens)


def _expected_rows(extend_lens: list[int], logits_lens: list[int]) -> list[int]:
    rows, start = [], 0
    for e, k in zip(extend_lens, logits_lens):
        rows += range(start + e - k, start + e)
        start += e
    return rows


@pytest.mark.parametrize("logits_lens", [[2, 0, 2, 7], [1, 9, 0, 0], [0, 0, 0, 0], [5, 9, 2, 7]])
def test_logits_lens_returns_each_requests_last_rows_of_the_full_logits(runner, logits_lens):
    full = runner.forward(_mixed_input([])).logits
    kept = runner.forward(_mixed_input(logits_lens)).logits
    assert full.shape == (sum(map(len, CHUNKS)), TINY_VOCAB)
    assert kept.shape == (sum(logits_lens), TINY_VOCAB) and kept.dtype == torch.float32
    torch.testing.assert_close(kept, full[_expected_rows([len(c) for c in CHUNKS], logits_lens)],
                               atol=1e-5, rtol=1e-5)


def test_lm_head_projects_only_the_kept_hidden_rows(runner, monkeypatch):
    seen = []
    project = runner.model.compute_logits
    monkeypatch.setattr(runner.model, "compute_logits", lambda h: seen.append(h.shape[0]) or project(h))
    runner.forward(_mixed_input([2, 0, 2, 1]))
    assert seen == [5]


def test_sampling_with_logits_lens_matches_sampling_without(runner):
    """A request with 0 kept rows still samples from its last row (projected on its own)."""
    want = runner.forward(_mixed_input([], sample=True))
    got = runner.forward(_mixed_input([2, 0, 2, 1], sample=True))
    assert got.next_token_ids.tolist() == want.next_token_ids.tolist()
    assert (got.next_token_ids >= 0).all()


def test_logits_lens_longer_than_the_extend_is_refused(runner):
    with pytest.raises(AssertionError):
        runner.forward(_mixed_input([6, 0, 0, 0]))
