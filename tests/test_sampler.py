"""Sampler: seeds, top-k / top-p support, min_tokens masking of EOS, penalties, logprobs."""
from __future__ import annotations

import torch

from cluster.engine.sampler import sample
from cluster.sampling_params import SamplingParams

V = 50


def _logits(b: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 2


def _draw(logits, sp, n=200, gen=None, **kw):
    out = []
    for _ in range(n):
        ids, _, _ = sample(logits, [sp] * logits.shape[0], [gen] * logits.shape[0], [], [], [], **kw)
        out.append(int(ids[0]))
    return out


def test_greedy_is_argmax():
    logits = _logits(4)
    ids, lps, _ = sample(logits, [SamplingParams()] * 4, [], [], [], [])
    assert ids.tolist() == logits.argmax(-1).tolist() and lps is None


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = _logits()
    sp = SamplingParams(temperature=1.0)
    a = _draw(logits, sp, 50, torch.Generator().manual_seed(7))
    b = _draw(logits, sp, 50, torch.Generator().manual_seed(7))
    c = _draw(logits, sp, 50, torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_seeded_rows_in_a_batch_do_not_depend_on_neighbours():
    logits = _logits(3)
    sp = SamplingParams(temperature=0.8)
    alone, _, _ = sample(logits[1:2], [sp], [torch.Generator().manual_seed(3)], [], [], [])
    batch, _, _ = sample(logits, [SamplingParams(temperature=1.5), sp, SamplingParams()],
                      [None, torch.Generator().manual_seed(3), None], [], [], [])
    assert int(batch[1]) == int(alone[0])


def test_top_k_restricts_support_to_k_best():
    logits = _logits()
    top = set(logits[0].topk(3).indices.tolist())
    drawn = set(_draw(logits, SamplingParams(temperature=5.0, top_k=3), 300, torch.Generator().manual_seed(0)))
    assert drawn <= top and len(drawn) == 3


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.full((1, V), -10.0)
    logits[0, :4] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    probs = logits.softmax(-1)[0]
    p = float(probs[0] + probs[1]) - 1e-4   # the two best reach p, the first alone does not
    drawn = set(_draw(logits, SamplingParams(temperature=1.0, top_p=p), 300, torch.Generator().manual_seed(0)))
    assert drawn == {0, 1}
    drawn = set(_draw(logits, SamplingParams(temperature=1.0, top_p=0.01), 50, torch.Generator().manual_seed(0)))
    assert drawn == {0}


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(1, V)
    logits[0, 2] = 10.0
    logits[0, 9] = 9.0
    logits[0, 5] = 8.0
    sp = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[9])
    ids, _, _ = sample(logits, [sp], [None], [], [1], [frozenset({2})])
    assert int(ids[0]) == 5
    ids, _, _ = sample(logits, [sp], [None], [], [0], [frozenset({2})])
    assert int(ids[0]) == 2


def test_repetition_presence_frequency_penalties():
    logits = torch.tensor([[3.0, 2.9, -1.0, -1.1, 0.0]])
    ids, _, _ = sample(logits, [SamplingParams(repetition_penalty=2.0)], [None], [[0]], [], [])
    assert int(ids[0]) == 1                       # 3.0 / 2 < 2.9
    ids, _, _ = sample(logits[:, 2:4], [SamplingParams(repetition_penalty=2.0)], [None], [[0]], [], [])
    assert int(ids[0]) == 1                       # negative logit is multiplied: -2.0 < -1.1
    ids, _, _ = sample(logits, [SamplingParams(presence_penalty=0.5)], [None], [[0, 0, 0]], [], [])
    assert int(ids[0]) == 1                       # 3.0 - 0.5
    ids, _, _ = sample(logits, [SamplingParams(frequency_penalty=0.05)], [None], [[0]], [], [])
    assert int(ids[0]) == 0                       # one occurrence: 2.95 > 2.9
    ids, _, _ = sample(logits, [SamplingParams(frequency_penalty=0.05)], [None], [[0, 0, 0]], [], [])
    assert int(ids[0]) == 1                       # three: 2.85 < 2.9


def test_logprob_of_chosen_token_is_raw_model_logprob():
    logits = _logits(2)
    sps = [SamplingParams(logprobs=True), SamplingParams(temperature=0.7, logprobs=True)]
    ids, lps, _ = sample(logits, sps, [None, torch.Generator().manual_seed(1)], [], [], [])
    ref = torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(lps, ref)
