"""ActiveBlock: the positions of one request being filled, and one step of filling them.

The block covers sequence positions `start .. start + len - 1` (the next output tokens);
`tokens[j]` is None while position j is masked. `attn_start <= start` is where the
bidirectional region begins: `start` itself, or the block boundary before it when blocks
are aligned to multiples of the block size (SDAR: the prompt's tail shares the first block).
"""
from __future__ import annotations

from typing import Optional

import torch

from dllm.algorithms import (ban_tokens, choose_tokens, commit_fixed_steps, commit_low_confidence,
                             fixed_steps_plan)
from cluster.dllm_params import DllmParams


class ActiveBlock:
    __slots__ = ("start", "attn_start", "tokens", "logprobs", "plan", "num_steps")

    def __init__(self, start: int, length: int, params: DllmParams, attn_start: Optional[int] = None):
        assert length >= 1
        self.start = start
        self.attn_start = start if attn_start is None else attn_start
        self.tokens: list[Optional[int]] = [None] * length
        self.logprobs: list[float] = [0.0] * length
        self.plan = fixed_steps_plan(length, params.steps_per_block) if params.algorithm == "fixed_steps" else None
        self.num_steps = 0          # forwards this block has taken

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def masked(self) -> list[int]:
        return [j for j, t in enumerate(self.tokens) if t is None]

    @property
    def is_complete(self) -> bool:
        return all(t is not None for t in self.tokens)

    def input_ids(self, mask_token_id: int) -> list[int]:
        return [mask_token_id if t is None else t for t in self.tokens]

    def ends_at(self, stop_ids: frozenset) -> Optional[int]:
        """Index of the first stop token in the block's committed leading run, if any: the
        block (and the request) ends there whatever the later positions become."""
        for j, t in enumerate(self.tokens):
            if t is None:
                return None
            if t in stop_ids:
                return j
        return None

    def is_done(self, stop_ids: frozenset) -> bool:
        return self.is_complete or self.ends_at(stop_ids) is not None

    def final_tokens(self, stop_ids: frozenset) -> list[int]:
        """The committed tokens up to and including the first stop token."""
        end = self.ends_at(stop_ids)
        return list(self.tokens[: len(self.tokens) if end is None else end + 1])

    def step(self, logits: torch.Tensor, params: DllmParams, temperature: float = 0.0,
             generator: Optional[torch.Generator] = None, banned: frozenset = frozenset(),
             banned_before: int = 0, stop_ids: frozenset = frozenset(), top_k: int = 0,
             top_p: float = 1.0) -> list[int]:
        """One forward's commits. `logits` [len, V]: row j predicts position j. `banned` never
        comes out; `stop_ids` are also banned at positions j < `banned_before` (min_tokens).
        Returns the committed positions (ascending)."""
        masked = self.masked
        cand = logits[masked].float().clone()
        ban_tokens(cand, banned)
        early = [i for i, j in enumerate(masked) if j < banned_before]
        ban_tokens(cand, stop_ids, early)
        tokens, confidence = choose_tokens(cand, temperature, generator, top_k, top_p)
        if params.algorithm == "fixed_steps":
            count = self.plan[self.num_steps] if self.num_steps < len(self.plan) else len(masked)
            picks = commit_fixed_steps(confidence, count)
        else:
            picks = commit_low_confidence(confidence, params.threshold)
        logprobs = torch.log_softmax(cand[picks], dim=-1).gather(1, tokens[picks].view(-1, 1)).view(-1)
        for i, lp in zip(picks, logprobs.tolist()):
            self.tokens[masked[i]] = int(tokens[i])
            self.logprobs[masked[i]] = lp
        self.num_steps += 1
        return [masked[i] for i in picks]
