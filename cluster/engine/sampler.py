"""Sampling of one next token per request from its last-position logits (float32 [B, V]).

Order, as vLLM's: the processors that change which tokens are possible and how likely
(logit_bias, penalties, min_tokens' EOS ban, the grammar mask), then logprobs of that
processed distribution (chosen token and top-k), then temperature / top-k / top-p shape
only the draw.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from cluster.engine.grammar import accept_sampled, apply_grammar_masks
from cluster.sampling_params import SamplingParams

LOGPROB_FLOOR = -9999.0   # a banned token's logprob in top_logprobs (JSON has no -inf)


class Sampled(NamedTuple):
    next_ids: torch.Tensor                    # int64 [B]
    logprobs: Optional[torch.Tensor]          # float32 [B], the chosen tokens', or None
    top: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # ids int64 [B, k], logprobs [B, k]; k = max asked


def token_generator(seed: int, index: int, device=None) -> torch.Generator:
    """The generator that draws output token `index` of a request seeded with `seed`.

    One generator per token, derived from (seed, index), rather than one stream per request:
    a request prefilled again (retraction, resume on another worker) draws exactly what an
    uninterrupted run draws, whichever process samples which token."""
    mixed = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)
    return torch.Generator(device if device is not None else "cpu").manual_seed(mixed)


def sample(logits: torch.Tensor, sampling: list[SamplingParams], generators: list[Optional[torch.Generator]],
           prior_ids: list[list[int]], min_tokens_left: list[int], eos_token_ids: list[frozenset],
           grammars: list = ()) -> Sampled:
    """`grammars[i]`: request i's RequestGrammar or None; it accepts the sampled token here."""
    b = logits.shape[0]
    logits = logits.clone()
    for i, sp in enumerate(sampling):
        if sp.logit_bias:
            ids, bias = zip(*sp.logit_bias)
            logits[i, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
        if i < len(prior_ids) and prior_ids[i]:
            _penalize(logits[i], sp, prior_ids[i])
        if i < len(min_tokens_left) and min_tokens_left[i] > 0:   # min_tokens: no EOS / stop token yet
            banned = set(eos_token_ids[i] if i < len(eos_token_ids) else ()) | set(sp.stop_token_ids)
            if banned:
                logits[i, list(banned)] = float("-inf")
    if grammars:
        apply_grammar_masks(logits, list(grammars))
    logprobs = None
    if any(sp.logprobs for sp in sampling):
        logprobs = torch.log_softmax(logits, dim=-1)
    next_ids = logits.argmax(dim=-1)
    rows = [i for i, sp in enumerate(sampling) if not sp.is_greedy]
    if rows:
        probs = filtered_probs(logits[rows], [sampling[i] for i in rows])
        for j, i in enumerate(rows):
            gen = generators[i] if i < len(generators) else None
            next_ids[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    if grammars:
        accept_sampled(list(grammars), next_ids)
    if logprobs is None:
        return Sampled(next_ids, None)
    chosen = logprobs.gather(1, next_ids.view(b, 1)).view(b)
    k = max(sp.top_logprobs for sp in sampling)
    top = None
    if k:
        values, ids = logprobs.topk(k, dim=-1)
        top = (ids, values.clamp(min=LOGPROB_FLOOR))
    return Sampled(next_ids, chosen, top)


def _penalize(row: torch.Tensor, sp: SamplingParams, prior: list[int]) -> None:
    counts = torch.bincount(torch.tensor(prior, dtype=torch.int64, device=row.device), minlength=row.numel())
    seen = counts > 0
    if sp.repetition_penalty != 1.0:   # CTRL / HF: shrink seen logits towards less likely
        r = row[seen]
        row[seen] = torch.where(r > 0, r / sp.repetition_penalty, r * sp.repetition_penalty)
    if sp.presence_penalty or sp.frequency_penalty:   # OpenAI: subtract per seen token / per occurrence
        row -= sp.presence_penalty * seen.to(row.dtype) + sp.frequency_penalty * counts.to(row.dtype)


def filtered_probs(logits: torch.Tensor, sampling: list[SamplingParams]) -> torch.Tensor:
    """Per row: temperature, then top-k and top-p, then softmax (the DLLM worker reuses it)."""
    temps = torch.tensor([sp.temperature for sp in sampling], dtype=logits.dtype, device=logits.device)
    logits = logits / temps[:, None]
    top_k = [sp.top_k if sp.top_k > 0 else logits.shape[1] for sp in sampling]
    top_p = [sp.top_p for sp in sampling]
    if any(k < logits.shape[1] for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=logits.device)[None, :]
        drop = rank >= torch.tensor(top_k, device=logits.device)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop |= (probs.cumsum(dim=-1) - probs) > torch.tensor(top_p, device=logits.device)[:, None]
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)
