"""The cost model a profile holds, fitted by least squares from its measured samples.

A profile (JSON, written by `pdcluster profile`) has three sample lists:
`prefill` [[tokens, seconds]], `decode` [[batch, context_tokens, seconds]] (context = the
batch's summed sequence lengths) and `transfer` [[bytes, seconds]], plus `kv_bytes_per_token`.
Each is fitted as a line: prefill a + b*tokens; decode step c + d*batch + e*context;
transfer f + g*bytes (coefficients >= 0: a cost never shrinks with work; `_fit`).

Co-running (co_run.py): a profile's `co_run` {"prefill": f, "decode": g} says how much slower a
prefill step runs while a decode worker steps, and a decode step while a prefill worker runs
(workers sharing a host's cores); absent, both are 1.

Tensor parallelism: a profile is measured on one-GPU workers; a worker of `tp` ranks runs each
prefill and decode step `tp * tp_efficiency` times faster (`for_tp`). `tp_efficiency` (speedup
over tp) comes from the profile's `tp_efficiency` when someone measured it, else `pdcluster plan
--tp-efficiency`, else DEFAULT_TP_EFFICIENCY, an assumption: NVLink all-reduces of an 8B-class
model commonly give 0.7-0.9 at tp 2-4. Nothing else changes with tp: the KV transfer moves the
same bytes, and the larger pool a TP worker has is not modelled (`max_running` stays the limit).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np


DEFAULT_TP_EFFICIENCY = 0.8


class ProfileError(ValueError):
    pass


def _fit(rows: list, name: str, width: int) -> tuple[float, ...]:
    """Least squares with every coefficient >= 0 (a cost never shrinks with work): a term whose
    free fit is negative is dropped and the rest refitted. Clipping a joint fit instead is wrong
    where the terms move together (a decode batch's size and its context): the negative term
    was offsetting an inflated partner, which clipping leaves inflated."""
    if not rows or any(len(r) != width for r in rows):
        raise ProfileError(f"profile: {name} needs rows of {width} numbers")
    a = np.array(rows, dtype=np.float64)
    x = np.hstack([np.ones((len(a), 1)), a[:, :-1]])
    keep = list(range(width))
    coef = np.zeros(width)
    while keep:
        sol, *_ = np.linalg.lstsq(x[:, keep], a[:, -1], rcond=None)
        if (sol >= 0).all():
            coef[keep] = sol
            break
        del keep[int(np.argmin(sol))]
    return tuple(float(c) for c in coef)


@dataclass(frozen=True)
class CostModel:
    prefill_coef: tuple[float, float]
    decode_coef: tuple[float, float, float]
    transfer_coef: tuple[float, float]
    kv_bytes_per_token: float
    tp_efficiency: float = DEFAULT_TP_EFFICIENCY
    co_run_prefill: float = 1.0
    co_run_decode: float = 1.0

    def __post_init__(self):
        if not 0 < self.tp_efficiency <= 1:
            raise ProfileError(f"tp_efficiency {self.tp_efficiency} is not in (0, 1]")
        if self.co_run_prefill < 1 or self.co_run_decode < 1:
            raise ProfileError("co_run factors must be >= 1")

    @classmethod
    def from_profile(cls, profile: dict) -> "CostModel":
        return cls(_fit(profile.get("prefill", []), "prefill", 2),
                   _fit(profile.get("decode", []), "decode", 3),
                   _fit(profile.get("transfer", [[0, 0.0], [1, 0.0]]), "transfer", 2),
                   float(profile.get("kv_bytes_per_token", 0)),
                   float(profile.get("tp_efficiency", DEFAULT_TP_EFFICIENCY)),
                   float(profile.get("co_run", {}).get("prefill", 1.0)),
                   float(profile.get("co_run", {}).get("decode", 1.0)))

    def for_tp(self, tp: int) -> "CostModel":
        """The costs of a worker of `tp` ranks: its steps `tp * tp_efficiency` times faster."""
        if tp == 1:
            return self
        speedup = tp * self.tp_efficiency
        return replace(self, prefill_coef=tuple(c / speedup for c in self.prefill_coef),
                       decode_coef=tuple(c / speedup for c in self.decode_coef))

    @classmethod
    def load(cls, path: str) -> "CostModel":
        with open(path) as f:
            return cls.from_profile(json.load(f))

    def prefill(self, tokens: int) -> float:
        a, b = self.prefill_coef
        return a + b * tokens

    def decode_step(self, batch: int, context: int) -> float:
        c, d, e = self.decode_coef
        return c + d * batch + e * context

    def transfer(self, tokens: int) -> float:
        f, g = self.transfer_coef
        return f + g * tokens * self.kv_bytes_per_token
