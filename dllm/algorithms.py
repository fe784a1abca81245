"""Block-diffusion commit rules: pure functions over the logits of a request's active block.

One step (one forward) of filling a block:

1. `ban_tokens` removes what may never come out at a position (the mask token; EOS and stop
   ids before `min_tokens`).
2. `choose_tokens` gives every still-masked position a candidate token and a confidence:
   greedy (argmax, confidence = its softmax probability) or, with a temperature, a draw from
   `softmax(logits / T)` through the request's own `torch.Generator` (confidence = the
   drawn token's probability under that distribution, as SDAR does).
3. A rule picks which candidates to commit:
   - low confidence threshold (Fast-dLLM): every candidate whose confidence exceeds the
     threshold, and always at least one (the most confident), so a block of n positions
     needs at most n forwards;
   - fixed steps (LLaDA): `fixed_steps_plan` spreads the block's masks evenly over
     `steps_per_block` forwards; step k commits the plan[k] most confident candidates.

Ties in confidence go to the leftmost position, so a greedy run is deterministic.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from cluster.engine.sampler import filtered_probs
from cluster.sampling_params import SamplingParams


def ban_tokens(logits: torch.Tensor, token_ids: Iterable[int], rows: Optional[list[int]] = None) -> None:
    """In place: `token_ids` get -inf in `rows` (all rows when None)."""
    ids = [t for t in set(token_ids) if 0 <= t < logits.shape[-1]]
    if not ids:
        return
    if rows is None:
        logits[:, ids] = float("-inf")
    elif rows:
        logits[torch.tensor(rows)[:, None], torch.tensor(ids)[None, :]] = float("-inf")


def choose_tokens(logits: torch.Tensor, temperature: float = 0.0,
                  generator: Optional[torch.Generator] = None, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float [n, V] -> (tokens int64 [n], confidence float32 [n]); sampling filters as
    the autoregressive sampler's (temperature, top-k, top-p)."""
    logits = logits.float()
    if temperature == 0.0:
        probs = logits.softmax(dim=-1)
        confidence, tokens = probs.max(dim=-1)
        return tokens, confidence
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    probs = filtered_probs(logits, [sp] * logits.shape[0])
    tokens = torch.multinomial(probs, 1, generator=generator).view(-1)
    return tokens, probs.gather(1, tokens.view(-1, 1)).view(-1)


def most_confident(confidence: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` most confident candidates (ties: leftmost first), ascending."""
    count = max(0, min(count, confidence.numel()))
    order = torch.sort(confidence, descending=True, stable=True).indices
    return sorted(order[:count].tolist())


def commit_low_confidence(confidence: torch.Tensor, threshold: float) -> list[int]:
    """Every candidate above `threshold`; the most confident one when none is."""
    above = (confidence > threshold).nonzero().view(-1).tolist()
    return above if above else most_confident(confidence, 1)


def fixed_steps_plan(num_masked: int, steps: int) -> list[int]:
    """How many positions each step commits: `num_masked` spread evenly over `steps` steps
    (earlier steps take the remainder), never a step that commits nothing."""
    steps = max(1, min(steps, num_masked))
    base, rem = divmod(num_masked, steps)
    return [base + 1] * rem + [base] * (steps - rem)


def commit_fixed_steps(confidence: torch.Tensor, count: int) -> list[int]:
    """The step's planned `count` most confident candidates."""
    return most_confident(confidence, count)
