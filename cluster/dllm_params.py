"""DllmParams: how one DLLM request's blocks are filled (block size, commit rule, its knobs).

The type is the one validator of these values: the config loader (`[[dllm]]` groups), the
router (per-request `extra_body` overrides) and the wire check of `generate.dllm` all build
one through `__post_init__`. A request's params are its group's, replaced by its overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from cluster.sampling_params import InvalidParam, _float, _int

DLLM_ALGORITHMS = ("low_confidence", "fixed_steps")
MAX_BLOCK_SIZE = 64


@dataclass(frozen=True, slots=True)
class DllmParams:
    block_size: int = 1
    algorithm: str = "low_confidence"   # low_confidence | fixed_steps
    threshold: float = 0.9              # low_confidence: commit every position above it (0: all)
    steps_per_block: int = 1            # fixed_steps: forwards a full block is spread over

    def __post_init__(self) -> None:
        _int(self, "block_size", lo=1, hi=MAX_BLOCK_SIZE)
        if self.algorithm not in DLLM_ALGORITHMS:
            raise InvalidParam("algorithm", f"{self.algorithm!r} is not one of {', '.join(DLLM_ALGORITHMS)}")
        _float(self, "threshold", lo=0.0, hi=1.0)
        _int(self, "steps_per_block", lo=1)

    @classmethod
    def from_group(cls, group) -> "DllmParams":
        if group is None:
            return cls()
        return cls(block_size=group.block_size, algorithm=group.algorithm,
                   threshold=group.threshold, steps_per_block=group.steps_per_block)

    def with_overrides(self, overrides: dict[str, Any]) -> "DllmParams":
        """These params replaced by `overrides` (a map of some of the field names)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidParam(unknown[0], f"not a DLLM parameter (known: {', '.join(sorted(names))})")
        return replace(self, **overrides) if overrides else self
