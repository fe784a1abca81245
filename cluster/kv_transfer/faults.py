"""TEST-ONLY fault injection on the KV transfer path (the kv_transfer package docstring says how).

`PDCLUSTER_TEST_KV_FAULT="drop=0.1,corrupt=0.1,seed=7"`: each transferred request is dropped
with probability `drop` (left out of its kv_batch, so it never arrives) or, else, corrupted
with probability `corrupt` (its bytes after the checksum was taken, or, for backends that read
the prefill pool in place, the checksum itself). Unset or empty: no faults.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Optional

ENV = "PDCLUSTER_TEST_KV_FAULT"
logger = logging.getLogger("pdcluster.kv_transfer")


@dataclass(frozen=True, slots=True)
class KvFaultSpec:
    drop: float = 0.0
    corrupt: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("drop", "corrupt"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{ENV}: {name}={p} is not a probability in [0, 1]")

    @classmethod
    def parse(cls, text: str) -> "KvFaultSpec":
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("drop", "corrupt", "seed"):
                raise ValueError(f"{ENV}: {part!r} is not drop=P, corrupt=P or seed=N")
            try:
                fields[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ValueError(f"{ENV}: {part!r} has a bad number") from None
        return cls(**fields)


class KvFaults:
    """Draws, per transferred request, whether to drop or corrupt it."""

    def __init__(self, spec: KvFaultSpec):
        self.spec = spec
        self._rng = random.Random(spec.seed)

    @classmethod
    def from_env(cls, env=None) -> Optional["KvFaults"]:
        text = (os.environ if env is None else env).get(ENV, "")
        if not text:
            return None
        faults = cls(KvFaultSpec.parse(text))
        logger.warning("%s=%s: KV transfers will be dropped or corrupted (tests only)", ENV, text)
        return faults

    def draw(self) -> Optional[str]:
        """"drop", "corrupt" or None for the next request."""
        x = self._rng.random()
        if x < self.spec.drop:
            return "drop"
        if x < self.spec.drop + self.spec.corrupt:
            return "corrupt"
        return None
