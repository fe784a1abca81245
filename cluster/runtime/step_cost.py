"""StepCostModel: how long one of this worker's forwards takes, fitted online from its own
steps, and the prefill chunk a step may carry within a time budget.

The model is a plane: `seconds = base + per_row * decode_rows + per_token * prefill_tokens`
(the weights are read once per step; each decode row and each prompt token adds its own
attention and MLP work). It is fitted by least squares over the last `window` steps plus a
prior on `per_token`: the penalty `prior_weight * (PRIOR_CHUNK * (per_token - prior))^2` weighs
like `prior_weight` steps of a `PRIOR_CHUNK`-token chunk. `base` and `per_row` need no prior:
every decode step measures them, many times a second. With no steps the prior alone speaks;
decode-only steps leave `per_token` at its prior until chunks have run; then the data wins.

The prior is conservative: `PRIOR_TOKEN_S` per prompt token is what the default model costs
on a slow CPU, so the first chunks are small on any machine and grow as steps are measured.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, Optional

import numpy as np

PRIOR_TOKEN_S = 2e-3          # seconds per prompt token before any chunk was measured
PRIOR_CHUNK = 16              # the prior weighs like steps of this many prompt tokens
WINDOW = 64                   # steps the fit remembers
BUDGET_SHARE = 0.9            # a chunk may fill this share of the budget: the fit is not exact


class Coefs(NamedTuple):
    base: float
    per_row: float
    per_token: float

    def seconds(self, decode_rows: int, prefill_tokens: int) -> float:
        return self.base + self.per_row * decode_rows + self.per_token * prefill_tokens


class StepCostModel:
    def __init__(self, prior: Coefs = Coefs(0.0, 0.0, PRIOR_TOKEN_S), prior_weight: float = 1.0,
                 window: int = WINDOW):
        self.prior = prior
        self.steps: deque[tuple[int, int, float]] = deque(maxlen=window)   # (rows, tokens, seconds)
        # NOTE: a vanishing floor keeps the system solvable before the steps pin every coefficient
        self.penalty = np.array([1e-9, 1e-9, max(prior_weight * PRIOR_CHUNK ** 2, 1e-9)])
        self._coefs: Optional[Coefs] = None

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> None:
        """One measured forward: `decode_rows` one-token rows and `prefill_tokens` prompt tokens."""
        if seconds > 0 and decode_rows + prefill_tokens > 0:
            self.steps.append((decode_rows, prefill_tokens, seconds))
            self._coefs = None

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def coefs(self) -> Coefs:
        """The fitted coefficients (the prior's where the steps say nothing)."""
        coefs = self._coefs                   # NOTE: read once: the heartbeat thread fits too
        if coefs is None:
            steps = list(self.steps)
            x = np.array([(1.0, r, t) for r, t, _ in steps]).reshape(-1, 3)
            y = np.array([s for _, _, s in steps])
            a = x.T @ x + np.diag(self.penalty)
            b = x.T @ y + self.penalty * np.array(self.prior)
            coefs = self._coefs = Coefs(*(float(c) for c in np.linalg.solve(a, b)))
        return coefs

    def predict(self, decode_rows: int, prefill_tokens: int) -> float:
        return self.coefs.seconds(decode_rows, prefill_tokens)

    def chunk_tokens(self, decode_rows: int, budget_s: float, limit: int) -> int:
        """Prompt tokens a step with `decode_rows` decode rows may add and stay within
        `BUDGET_SHARE * budget_s` (at most `limit`; 0 when the decode rows alone fill it)."""
        c = self.coefs
        room = BUDGET_SHARE * budget_s - c.base - c.per_row * decode_rows
        if c.per_token <= 0:                       # a fit gone flat: no evidence tokens cost anything
            return limit if room > 0 else 0
        return int(min(limit, max(0.0, room / c.per_token)))

    def prefill_rate(self, decode_rows: int, budget_s: Optional[float], limit: int) -> float:
        """Prompt tokens per second this worker can prefill beside `decode_rows` decode rows,
        each step within `budget_s` (None: no budget, whole `limit`-token chunks)."""
        tokens = limit if budget_s is None or decode_rows == 0 else self.chunk_tokens(decode_rows, budget_s, limit)
        if tokens <= 0:
            return 0.0
        return tokens / max(self.predict(decode_rows, tokens), 1e-6)


class RateWindow:
    """Prompt tokens per second of forward time over the last `window` forwards: the rate the
    router divides a prefill worker's queued tokens by to predict its queueing."""

    def __init__(self, window: int = 16):
        self.steps: deque[tuple[int, float]] = deque(maxlen=window)   # (tokens, seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.steps.append((tokens, seconds))

    @property
    def rate(self) -> Optional[float]:
        """None before the first forward."""
        steps = list(self.steps)              # NOTE: a copy: the heartbeat thread reads it
        if not steps:
            return None
        return sum(t for t, _ in steps) / sum(s for _, s in steps)
