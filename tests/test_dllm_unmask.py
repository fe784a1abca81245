"""The batched tensor-op commit step (dllm/unmask.py) against the host rules it replaces
(ActiveBlock.step over algorithms.py), on random blocks, logits, thresholds and plans."""
import random

import pytest
import torch

from cluster.dllm_params import DllmParams
from dllm.block import ActiveBlock
from dllm.unmask import BlockState, active_rows, apply_to_block, unmask_step

VOCAB, MASK = 40, 39


def random_block(rng: random.Random, width: int):
    """A block part-way through filling, its params, stop ids and min_tokens bound."""
    length = rng.randint(1, width)
    if rng.random() < 0.5:
        params = DllmParams(block_size=width, threshold=rng.choice([0.0, 0.05, 0.1, 0.3, 0.9, 1.0, rng.random()]))
    else:
        params = DllmParams(block_size=width, algorithm="fixed_steps", steps_per_block=rng.randint(1, width + 1))
    block = ActiveBlock(rng.randint(0, 50), length, params)
    for j in range(length):
        if rng.random() < 0.3:
            block.tokens[j] = rng.randrange(VOCAB - 1)
            block.logprobs[j] = -rng.random()
    if block.plan is not None:
        block.num_steps = rng.randint(0, len(block.plan))
    stops = frozenset(rng.sample(range(VOCAB - 1), rng.randint(0, 3)))
    return block, params, stops, rng.randint(0, length + 1)


def random_logits(rng: random.Random, rows: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    logits = torch.randn(rows, width, VOCAB, generator=g) * rng.choice([0.5, 3.0, 8.0])
    if rng.random() < 0.5:   # ties of confidence between positions, and between tokens in a row
        logits = logits.round()
        logits[:, 1::2] = logits[:, ::2][:, :logits[:, 1::2].shape[1]]
    return logits


def host_step(block, params, stops, before, logits, banned):
    if block.is_done(stops):
        return None
    return block.step(logits[:len(block)], params, banned=banned, banned_before=before, stop_ids=stops)


@pytest.mark.parametrize("seed", range(40))
def test_tensor_step_commits_exactly_what_the_host_rules_commit(seed):
    rng = random.Random(seed)
    width, rows = rng.choice([1, 2, 4, 8]), rng.randint(1, 6)
    cases = [random_block(rng, width) for _ in range(rows)]
    banned = frozenset([MASK]) if rng.random() < 0.7 else frozenset()
    blocks = [c[0] for c in cases]
    state = BlockState.build(blocks, [c[1] for c in cases], [c[2] for c in cases], [c[3] for c in cases],
                             banned, VOCAB, MASK, rows=rows + rng.randint(0, 2), width=width + rng.randint(0, 1))
    mirror = [ActiveBlock(b.start, len(b), p) for b, p, *_ in cases]     # filled from the tensor rows
    for m, b in zip(mirror, blocks):
        m.tokens, m.logprobs, m.num_steps = list(b.tokens), list(b.logprobs), b.num_steps
    for _ in range(width + 1):
        logits = random_logits(rng, state.tokens.shape[0], state.width)
        expected = [host_step(b, p, s, before, logits[i], banned) for i, (b, p, s, before) in enumerate(cases)]
        unmask_step(state, logits)
        s = state.rows(rows)
        tokens, logprobs, commit_step, num_steps = (t.tolist() for t in (s.tokens, s.logprobs, s.commit_step,
                                                                          s.num_steps))
        for i, (block, want) in enumerate(zip(mirror, expected)):
            got = apply_to_block(block, tokens[i], logprobs[i], commit_step[i], num_steps[i])
            assert got == ([] if want is None else [want]), (i, got, want)
            assert block.tokens == blocks[i].tokens and block.num_steps == blocks[i].num_steps
            assert block.logprobs == pytest.approx(blocks[i].logprobs, abs=1e-6)
        assert active_rows(state).tolist()[:rows] == [not b.is_done(s) for b, _, s, _ in cases]
        assert int(state.num_active) == sum(not b.is_done(s) for b, _, s, _ in cases)


def test_padding_rows_never_commit_and_never_count_as_active():
    state = BlockState.empty(3, 4, 1, 1, VOCAB, MASK, "cpu")
    unmask_step(state, torch.randn(3, 4, VOCAB))
    assert not state.masked.any() and state.num_steps.tolist() == [0, 0, 0] and int(state.num_active) == 0
    assert (state.commit_step == -1).all()
