"""The cost model a profile holds, fitted by least squares from its measured samples.

A profile (JSON, written by `pdcluster profile`) has three sample lists:
`prefill` [[tokens, seconds]], `decode` [[batch, context_tokens, seconds]] (context = the
batch's summed sequence lengths) and `transfer` [[bytes, seconds]], plus `kv_bytes_per_token`.
Each is fitted as a line: prefill a + b*tokens; decode step c + d*batch + e*context;
transfer f + g*bytes (coefficients clipped at 0: a cost never shrinks with work).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np


class ProfileError(ValueError):
    pass


def _fit(rows: list, name: str, width: int) -> tuple[float, ...]:
    if not rows or any(len(r) != width for r in rows):
        raise ProfileError(f"profile: {name} needs rows of {width} numbers")
    a = np.array(rows, dtype=np.float64)
    x = np.hstack([np.ones((len(a), 1)), a[:, :-1]])
    coef, *_ = np.linalg.lstsq(x, a[:, -1], rcond=None)
    return tuple(max(0.0, float(c)) for c in coef)


@dataclass(frozen=True)
class CostModel:
    prefill_coef: tuple[float, float]
    decode_coef: tuple[float, float, float]
    transfer_coef: tuple[float, float]
    kv_bytes_per_token: float

    @classmethod
    def from_profile(cls, profile: dict) -> "CostModel":
        return cls(_fit(profile.get("prefill", []), "prefill", 2),
                   _fit(profile.get("decode", []), "decode", 3),
                   _fit(profile.get("transfer", [[0, 0.0], [1, 0.0]]), "transfer", 2),
                   float(profile.get("kv_bytes_per_token", 0)))

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
