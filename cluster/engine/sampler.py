"""Sampling of one next token per request from its last-position logits (float32 [B, V])."""
from __future__ import annotations

from typing import Optional

import torch

from cluster.sampling_params import SamplingParams


def sample(logits: torch.Tensor, sampling: list[SamplingParams], generators: list[Optional[torch.Generator]],
           prior_ids: list[list[int]], min_tokens_left: list[int], eos_token_ids: list[frozenset]):
    """-> (next ids int64 [B], logprobs float32 [B] or None). Logprobs are the model's raw ones."""
    b = logits.shape[0]
    logprobs = None
    if any(sp.logprobs for sp in sampling):
        logprobs = torch.log_softmax(logits, dim=-1)
    logits = logits.clone()
    for i, sp in enumerate(sampling):
        if i < len(prior_ids) and prior_ids[i]:
            _penalize(logits[i], sp, prior_ids[i])
        if i < len(min_tokens_left) and min_tokens_left[i] > 0:   # min_tokens: no EOS / stop token yet
            banned = set(eos_token_ids[i] if i < len(eos_token_ids) else ()) | set(sp.stop_token_ids)
            if banned:
                logits[i, list(banned)] = float("-inf")
    next_ids = logits.argmax(dim=-1)
    rows = [i for i, sp in enumerate(sampling) if not sp.is_greedy]
    if rows:
        probs = filtered_probs(logits[rows], [sampling[i] for i in rows])
        for j, i in enumerate(rows):
            gen = generators[i] if i < len(generators) else None
            next_ids[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    chosen = None if logprobs is None else logprobs.gather(1, next_ids.view(b, 1)).view(b)
    return next_ids, chosen


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
