"""A planning workload: request lengths and how they arrive (a JSON file, all keys optional).

    {"input_len": 512 | [lengths...], "output_len": 64 | [lengths...],
     "num_requests": 200, "arrival": "poisson" | "uniform", "seed": 0}

A list is a distribution: each request draws from it (seeded). `uniform` arrivals are evenly
spaced, which makes a simulated answer computable by hand.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Optional, Union

from cluster.plan.simulate import SimRequest

Lengths = Union[int, tuple[int, ...]]


@dataclass(frozen=True)
class Workload:
    input_len: Lengths = 512
    output_len: Lengths = 64
    num_requests: int = 200
    arrival: str = "poisson"
    seed: int = 0

    def __post_init__(self):
        if self.arrival not in ("poisson", "uniform"):
            raise ValueError(f"workload: arrival {self.arrival!r} is not poisson or uniform")
        if self.num_requests < 1:
            raise ValueError("workload: num_requests must be >= 1")

    @classmethod
    def load(cls, path: Optional[str]) -> "Workload":
        if not path:
            return cls()
        with open(path) as f:
            data = json.load(f)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"workload {path}: unknown keys {sorted(unknown)}")
        lists = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**{**data, **lists})

    def requests(self, rate: float) -> list[SimRequest]:
        rng = random.Random(self.seed)
        draw = lambda x: x if isinstance(x, int) else rng.choice(x)  # noqa: E731
        out, t = [], 0.0
        for _ in range(self.num_requests):
            out.append(SimRequest(t, draw(self.input_len), draw(self.output_len)))
            t += rng.expovariate(rate) if self.arrival == "poisson" else 1.0 / rate
        return out
