"""DllmParams: how one DLLM request's blocks are filled (block size, commit rule, its knobs).

The type is the one validator of these values: the config loader (`[[dllm]]` groups hold
one), the router (per-request `extra_body` overrides) and the wire check of `generate.dllm`
all build one through `__post_init__`, which raises InvalidParam naming the field. A request's params are its group's, replaced by its overrides.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from cluster.config_fields import ConfigError, check_fields, option
from cluster.sampling_params import InvalidParam

DLLM_ALGORITHMS = ("low_confidence", "fixed_steps")
MAX_BLOCK_SIZE = 64


@dataclass(frozen=True, slots=True)
class DllmParams:
    block_size: int = option(1, "dllm: tokens decoded together in one block", lo=1, hi=MAX_BLOCK_SIZE)
    algorithm: str = option("low_confidence", "dllm: how a block's positions are committed",
                            choices=DLLM_ALGORITHMS)
    threshold: float = option(0.9, "dllm low_confidence: commit every position above it (0: all)",
                              lo=0.0, hi=1.0)
    steps_per_block: int = option(1, "dllm fixed_steps: forwards a full block is spread over", lo=1)

    def __post_init__(self) -> None:
        try:
            check_fields(self)
        except ConfigError as e:            # a request's override is a 400 naming the parameter
            raise InvalidParam(e.key, e.reason) from None

    def with_overrides(self, overrides: dict[str, Any]) -> "DllmParams":
        """These params replaced by `overrides` (a map of some of the field names)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InvalidParam(unknown[0], f"not a DLLM parameter (known: {', '.join(sorted(names))})")
        return replace(self, **overrides) if overrides else self
