"""Sampling of one next token per request from its last-position logits (float32 [B, V]).

Order, as vLLM's: the processors that change which tokens are possible and how likely
(logit_bias, penalties, min_tokens' EOS ban, the grammar mask), then logprobs of that
processed distribution (chosen token and top-k), then temperature / top-k / top-p shape
only the draw.

Batched tensor ops on the logits' device, with no host sync: per-row parameters travel in
non-blocking copies, penalties are one scatter of counts, and a random row draws by inverse CDF
with one uniform number (from the request's own generator when it has a seed, on whatever device
that generator lives, so a seeded request draws the same tokens whatever its neighbours). Only a
grammar reads the sampled ids on the host (its matcher accepts them).
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


def is_plain_greedy(sampling: list[SamplingParams], prior_ids: list[list[int]], min_tokens_left: list[int],
                    grammars: list = ()) -> bool:
    """Argmax of the raw logits is the answer: no temperature, bias, penalty, EOS ban, grammar or logprobs."""
    return (all(sp.is_greedy and not sp.logprobs and not sp.logit_bias and not has_penalty(sp) for sp in sampling)
            and not any(n > 0 for n in min_tokens_left) and not any(g is not None for g in grammars))


def sample(logits: torch.Tensor, sampling: list[SamplingParams], generators: list[Optional[torch.Generator]],
           prior_ids: list[list[int]], min_tokens_left: list[int], eos_token_ids: list[frozenset],
           grammars: list = ()) -> Sampled:
    """`grammars[i]`: request i's RequestGrammar or None; it accepts the sampled token here."""
    b = logits.shape[0]
    raw = logits
    logits = _biased(logits, sampling)
    logits = _penalized(logits, sampling, prior_ids)
    logits = _ban_stop_tokens(logits, sampling, min_tokens_left, eos_token_ids)
    grammars = list(grammars) if any(g is not None for g in grammars) else []   # a list of Nones masks nothing
    if grammars:
        logits = logits.clone() if logits is raw else logits   # the mask applies in place
        apply_grammar_masks(logits, grammars)
    logprobs = torch.log_softmax(logits, dim=-1) if any(sp.logprobs for sp in sampling) else None
    next_ids = logits.argmax(dim=-1)
    rows = [i for i, sp in enumerate(sampling) if not sp.is_greedy]
    if rows:
        index = None if len(rows) == b else _on(logits.device, rows, torch.int64)
        probs = filtered_probs(logits if index is None else logits[index], [sampling[i] for i in rows])
        u = _uniforms([generators[i] if i < len(generators) else None for i in rows], logits.device)
        drawn = _inverse_cdf(probs, u)
        next_ids = drawn if index is None else next_ids.index_copy(0, index, drawn)
    if grammars:
        accept_sampled(grammars, next_ids)
    if logprobs is None:
        return Sampled(next_ids, None)
    chosen = logprobs.gather(1, next_ids.view(b, 1)).view(b)
    k = max(sp.top_logprobs for sp in sampling)
    top = None
    if k:
        values, ids = logprobs.topk(k, dim=-1)
        top = (ids, values.clamp(min=LOGPROB_FLOOR))
    return Sampled(next_ids, chosen, top)


def _biased(logits: torch.Tensor, sampling: list[SamplingParams]) -> torch.Tensor:
    """logit_bias: one index_add of every (row, token) bias."""
    pairs = [(i * logits.shape[1] + t, bias) for i, sp in enumerate(sampling) for t, bias in sp.logit_bias]
    if not pairs:
        return logits
    flat, bias = zip(*pairs)
    return logits.reshape(-1).index_add(0, _on(logits.device, list(flat), torch.int64),
                                        _on(logits.device, list(bias), logits.dtype)).view(logits.shape)


def has_penalty(sp: SamplingParams) -> bool:
    return sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0


def _on(device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on the device without waiting for it (a blocking copy syncs the stream)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _penalized(logits: torch.Tensor, sampling: list[SamplingParams], prior_ids: list[list[int]]) -> torch.Tensor:
    """CTRL / HF repetition penalty (shrink seen logits towards less likely), then OpenAI presence
    (per seen token) and frequency (per occurrence) penalties; counts from one scatter."""
    rows = [i for i, sp in enumerate(sampling) if i < len(prior_ids) and prior_ids[i] and has_penalty(sp)]
    if not rows:
        return logits
    ids = [t for i in rows for t in prior_ids[i]]
    owner = [j for j, i in enumerate(rows) for _ in prior_ids[i]]
    params = [[sampling[i].repetition_penalty, sampling[i].presence_penalty, sampling[i].frequency_penalty]
              for i in rows]
    dev = logits.device
    where = _on(dev, rows + owner + ids, torch.int64)
    row_idx, owner_t, ids_t = where.split([len(rows), len(owner), len(ids)])
    rep, presence, frequency = _on(dev, params, logits.dtype).unbind(1)
    vocab = logits.shape[1]
    counts = torch.zeros(len(rows), vocab, dtype=logits.dtype, device=dev)
    counts.view(-1).scatter_add_(0, owner_t * vocab + ids_t, torch.ones(len(ids), dtype=logits.dtype, device=dev))
    seen = counts > 0
    sub = logits.index_select(0, row_idx)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep[:, None], sub * rep[:, None]), sub)
    sub = sub - presence[:, None] * seen.to(sub.dtype) - frequency[:, None] * counts
    return logits.index_copy(0, row_idx, sub)


def _ban_stop_tokens(logits, sampling, min_tokens_left, eos_token_ids) -> torch.Tensor:
    """min_tokens: no EOS or stop token while a request still owes tokens."""
    pairs = []
    for i, sp in enumerate(sampling):
        if i < len(min_tokens_left) and min_tokens_left[i] > 0:
            banned = set(eos_token_ids[i] if i < len(eos_token_ids) else ()) | set(sp.stop_token_ids)
            pairs += [(i, t) for t in sorted(banned)]
    if not pairs:
        return logits
    flat = _on(logits.device, [i * logits.shape[1] + t for i, t in pairs], torch.int64)
    return logits.reshape(-1).index_fill(0, flat, float("-inf")).view(logits.shape)


def _uniforms(generators: list[Optional[torch.Generator]], device) -> torch.Tensor:
    """One uniform in [0, 1) per row: the row's generator where it has one, the device's otherwise."""
    u = torch.rand(len(generators), device=device)
    seeded = [j for j, g in enumerate(generators) if g is not None]
    if seeded:
        draws = torch.cat([torch.rand(1, generator=generators[j], device=generators[j].device).to(
            device, non_blocking=True) for j in seeded])
        u = u.index_copy(0, _on(device, seeded, torch.int64), draws)
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first token whose cumulative probability exceeds u * total (zero-probability tokens never
    win); a rounding overshoot past the last token falls back to the most likely one."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    ids = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[1] - 1)
    ok = probs.gather(1, ids) > 0
    return torch.where(ok, ids, probs.argmax(dim=-1, keepdim=True)).view(-1)


def filtered_probs(logits: torch.Tensor, sampling: list[SamplingParams]) -> torch.Tensor:
    """Per row: temperature, then top-k and top-p, then softmax (the DLLM worker reuses it)."""
    dev = logits.device
    vocab = logits.shape[1]
    temps = [sp.temperature if sp.temperature > 0 else 1.0 for sp in sampling]
    top_k = [sp.top_k if sp.top_k > 0 else vocab for sp in sampling]
    top_p = [sp.top_p for sp in sampling]
    params = _on(dev, [temps, top_k, top_p], torch.float32)
    logits = logits / params[0, :, None].to(logits.dtype)
    if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        drop = rank >= params[1, :, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop |= (probs.cumsum(dim=-1) - probs) > params[2, :, None]
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return logits.softmax(dim=-1)
