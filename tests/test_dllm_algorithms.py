"""Block-diffusion commit rules and one block step, on hand-made logits."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dllm.algorithms import (ban_tokens, choose_tokens, commit_low_confidence, fixed_steps_plan,
                             most_confident)
from dllm.block import ActiveBlock
from cluster.dllm_params import DllmParams

confidences = st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(confidences, st.floats(0.0, 1.0))
def test_threshold_rule_commits_every_position_above_threshold_and_at_least_one(conf, threshold):
    c = torch.tensor(conf, dtype=torch.float64)
    picked = commit_low_confidence(c, threshold)
    above = [i for i, x in enumerate(c.tolist()) if x > threshold]
    if above:
        assert picked == above
    else:
        assert len(picked) == 1 and c[picked[0]] == c.max()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64))
def test_fixed_plan_spreads_masks_evenly_and_never_plans_an_empty_step(n, steps):
    plan = fixed_steps_plan(n, steps)
    assert sum(plan) == n and len(plan) == min(n, steps)
    assert min(plan) >= 1 and max(plan) - min(plan) <= 1
    assert plan == sorted(plan, reverse=True)


def test_most_confident_breaks_ties_to_the_left():
    assert most_confident(torch.tensor([0.5, 0.9, 0.5, 0.9, 0.1]), 3) == [0, 1, 3]
    assert most_confident(torch.tensor([0.2, 0.2]), 5) == [0, 1]


def test_greedy_choice_is_argmax_with_its_probability():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    tokens, conf = choose_tokens(logits)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(conf, logits.softmax(-1).max(-1).values)


def test_seeded_temperature_choice_repeats_and_follows_the_distribution():
    logits = torch.randn(6, 50)
    a = choose_tokens(logits, 0.7, torch.Generator().manual_seed(3))
    b = choose_tokens(logits, 0.7, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    probs = (logits / 0.7).softmax(-1)
    assert torch.allclose(a[1], probs.gather(1, a[0][:, None]).view(-1))


def test_banned_tokens_never_come_out():
    logits = torch.zeros(4, 8)
    logits[:, 5] = 100.0
    ban_tokens(logits, [5])
    assert 5 not in choose_tokens(logits)[0].tolist()
    logits = torch.zeros(3, 8)
    logits[:, 2] = 100.0
    ban_tokens(logits, [2], rows=[0, 2])
    assert choose_tokens(logits)[0].tolist()[1] == 2


def peaked(rows: list[tuple[int, float]], vocab: int = 16) -> torch.Tensor:
    """Logits whose row j has token rows[j][0] with probability about rows[j][1]."""
    out = torch.zeros(len(rows), vocab)
    for j, (tok, p) in enumerate(rows):
        out[j, tok] = torch.log(torch.tensor(p * (vocab - 1) / (1 - p)))
    return out


def test_block_step_with_threshold_commits_confident_positions_into_the_block():
    block = ActiveBlock(start=10, length=4, params=DllmParams(block_size=4, threshold=0.8))
    logits = peaked([(3, 0.95), (4, 0.5), (5, 0.85), (6, 0.3)])
    assert block.step(logits, DllmParams(block_size=4, threshold=0.8)) == [0, 2]
    assert block.tokens == [3, None, 5, None] and block.masked == [1, 3] and block.num_steps == 1
    # rows of committed positions are ignored; the most confident masked one goes alone
    assert block.step(logits, DllmParams(block_size=4, threshold=0.8)) == [1]
    assert block.tokens == [3, 4, 5, None]


def test_block_step_with_fixed_steps_commits_the_planned_count():
    params = DllmParams(block_size=5, algorithm="fixed_steps", steps_per_block=2)
    block = ActiveBlock(start=0, length=5, params=params)
    assert block.plan == [3, 2]
    logits = peaked([(1, 0.2), (2, 0.9), (3, 0.5), (4, 0.7), (5, 0.3)])
    assert block.step(logits, params) == [1, 2, 3]
    assert block.step(logits, params) == [0, 4]
    assert block.is_complete and block.tokens == [1, 2, 3, 4, 5]


def test_block_ends_at_a_stop_token_once_everything_before_it_is_committed():
    params = DllmParams(block_size=4, threshold=0.0)
    block = ActiveBlock(start=0, length=4, params=params)
    block.tokens = [7, None, 2, None]
    assert not block.is_done(frozenset({2}))
    block.tokens[1] = 9
    assert block.is_done(frozenset({2})) and block.final_tokens(frozenset({2})) == [7, 9, 2]


def test_stop_ids_are_banned_before_min_tokens():
    params = DllmParams(block_size=3, threshold=0.0)
    block = ActiveBlock(start=0, length=3, params=params)
    logits = torch.zeros(3, 8)
    logits[:, 2] = 50.0
    block.step(logits, params, stop_ids=frozenset({2}), banned_before=2)
    assert block.tokens[0] != 2 and block.tokens[1] != 2 and block.tokens[2] == 2


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"algorithm": "nope"}, {"threshold": 1.5},
                                 {"steps_per_block": 0}, {"block_size": "4"}, {"block_size": 65},
                                 {"other": 1}])
def test_bad_overrides_are_rejected(bad):
    with pytest.raises(ValueError):
        DllmParams().with_overrides(bad)


def test_overrides_replace_only_dllm_keys():
    p = DllmParams(block_size=2).with_overrides({"block_size": 8, "threshold": 1})
    assert p == DllmParams(block_size=8, threshold=1.0)


def test_sampling_filters_apply_top_k_1_is_greedy_and_top_p_keeps_the_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    greedy = choose_tokens(logits)[0]
    for seed in range(5):
        sampled = choose_tokens(logits, 1.5, torch.Generator().manual_seed(seed), top_k=1)[0]
        assert sampled.tolist() == greedy.tolist()
    logits = torch.full((1, 10), -10.0)
    logits[0, 3] = 10.0                     # ~all the mass on token 3
    for seed in range(5):
        assert choose_tokens(logits, 1.0, torch.Generator().manual_seed(seed), top_p=0.5)[0].item() == 3
