"""DllmParams: how one request's blocks are filled (block size, commit rule and its knobs).

Defaults come from the `[[dllm]]` group; a request may override any of them through
`Generate.extra` (`block_size`, `algorithm`, `threshold`, `steps_per_block`).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from cluster.config import DLLM_ALGORITHMS


@dataclass(frozen=True, slots=True)
class DllmParams:
    block_size: int = 1
    algorithm: str = "low_confidence"   # low_confidence | fixed_steps
    threshold: float = 0.9              # low_confidence: commit every position above it
    steps_per_block: int = 1            # fixed_steps: forwards a full block is spread over

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.algorithm not in DLLM_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {DLLM_ALGORITHMS}, got {self.algorithm!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if isinstance(self.steps_per_block, bool) or not isinstance(self.steps_per_block, int) \
                or self.steps_per_block < 1:
            raise ValueError(f"steps_per_block must be an integer >= 1, got {self.steps_per_block!r}")

    @classmethod
    def from_group(cls, group) -> "DllmParams":
        if group is None:
            return cls()
        return cls(block_size=group.block_size, algorithm=group.algorithm,
                   threshold=float(group.threshold), steps_per_block=group.steps_per_block)

    def with_overrides(self, extra: dict) -> "DllmParams":
        """The request's params: these defaults, replaced by the DLLM keys of `extra` (others ignored)."""
        names = {f.name for f in fields(self)}
        overrides = {k: v for k, v in extra.items() if k in names and v is not None}
        if isinstance(overrides.get("threshold"), int) and not isinstance(overrides["threshold"], bool):
            overrides["threshold"] = float(overrides["threshold"])
        return replace(self, **overrides) if overrides else self
