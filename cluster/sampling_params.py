"""Per-request sampling parameters, shared by the router, the workers and the engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "ebnf")   # structured outputs (engine/grammar.py)
MAX_TOP_LOGPROBS = 20

@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 = off
    min_tokens: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False            # return the logprob of each chosen token
    top_logprobs: int = 0             # and the k most likely tokens' (0..20)
    logit_bias: list = field(default_factory=list)   # [[token_id, bias], ...], bias in [-100, 100]
    grammar_kind: str = ""            # "" = unconstrained, else one of GRAMMAR_KINDS
    grammar_spec: str = ""            # the JSON schema text, the regex or the EBNF

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be in [0, max_tokens]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.top_k < -1:
            raise ValueError("top_k must be -1, 0 or positive")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        self.logit_bias = [_bias_pair(p) for p in self.logit_bias]
        if self.grammar_kind and self.grammar_kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar_kind must be one of {', '.join(GRAMMAR_KINDS)}")
        if self.grammar_spec and not self.grammar_kind:
            raise ValueError("grammar_spec needs a grammar_kind")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_wire(cls, d: dict) -> "SamplingParams":
        unknown = set(d) - set(cls.__slots__)
        if unknown:
            raise ValueError(f"unknown sampling fields: {sorted(unknown)}")
        return cls(**d)


def _bias_pair(pair) -> list:
    """[token_id, bias] with an int id >= 0 and a bias in [-100, 100] (OpenAI's range)."""
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)
            and not isinstance(pair[0], bool) and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
        raise ValueError(f"logit_bias entries must be [token_id, bias], got {pair!r}")
    if pair[0] < 0 or not -100 <= pair[1] <= 100:
        raise ValueError(f"logit_bias: token id must be >= 0 and bias in [-100, 100], got {pair!r}")
    return [pair[0], float(pair[1])]
