"""Per-request sampling parameters, shared by the router, the workers and the engine.

The type is its own validator: `__post_init__` checks every field's type and bounds, and
the router (HTTP body), the wire codec (`generate`, `reprefill`) and the offline `LLM` all
build one through it, so a value means and is bounded the same everywhere. The wire always
carries the request's original parameters; `max_tokens` / `min_tokens` count all output
tokens, including those generated before a resume or a retraction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

MAX_STOP_STRINGS = 1024
MAX_STOP_CHARS = 4096             # per stop string: the worker matches each against every step
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1   # what msgpack and torch's generator carry
INT32_MAX = (1 << 31) - 1
MAX_FLOAT = 1e300
GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "ebnf")   # structured outputs (engine/grammar.py)
MAX_TOP_LOGPROBS = 20


class InvalidParam(ValueError):
    """A parameter out of its type or bounds; `name` is the field (for 400s and config keys)."""

    def __init__(self, name: str, reason: str):
        super().__init__(name, reason)      # args rebuild it (copies, pickling by others)
        self.name, self.reason = name, reason

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def _int(obj, name: str, lo: Optional[int] = None, hi: Optional[int] = None,
         optional: bool = False) -> None:
    v = getattr(obj, name)
    if v is None and optional:
        return
    if type(v) is not int:                         # bool is an int subclass: refuse it
        raise InvalidParam(name, f"expected an integer, got {type(v).__name__} {v!r}")
    if lo is not None and v < lo:
        raise InvalidParam(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParam(name, f"must be <= {hi}, got {v}")


def _float(obj, name: str, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False) -> None:
    v = getattr(obj, name)
    # NOTE: an int past a float's range would raise OverflowError in isfinite, not fail here
    if type(v) not in (int, float) or abs(v) > MAX_FLOAT or not math.isfinite(v):
        raise InvalidParam(name, f"expected a finite number, got {type(v).__name__} {v!r}")
    object.__setattr__(obj, name, float(v))        # an int where a float is meant
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise InvalidParam(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise InvalidParam(name, f"must be <= {hi}, got {v}")


def _list(obj, name: str, kind: type, max_len: int, max_item_len: Optional[int] = None) -> None:
    v = getattr(obj, name)
    if not isinstance(v, (list, tuple)) or len(v) > max_len or not all(type(x) is kind for x in v):
        raise InvalidParam(name, f"expected a list of at most {max_len} {kind.__name__}")
    if max_item_len is not None and any(len(x) > max_item_len for x in v):
        raise InvalidParam(name, f"each item must be at most {max_item_len} long")
    object.__setattr__(obj, name, list(v))


@dataclass(frozen=True, slots=True)
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
    prompt_logprobs: bool = False     # the model's logprob of each prompt token after the first (echo)

    def for_choice(self, j: int) -> "SamplingParams":
        """Choice j of n (n > 1): seeded `seed + j`, so every choice is reproducible alone."""
        return self if self.seed is None or j == 0 else replace(self, seed=self.seed + j)

    def __post_init__(self) -> None:
        _int(self, "max_tokens", lo=1, hi=INT32_MAX)
        _float(self, "temperature", lo=0)
        _float(self, "top_p", lo=0, hi=1, lo_open=True)
        _int(self, "top_k", lo=-1, hi=INT32_MAX)     # and <= the vocabulary, where known
        _int(self, "min_tokens", lo=0, hi=self.max_tokens)
        _int(self, "seed", lo=SEED_MIN, hi=SEED_MAX, optional=True)
        _list(self, "stop", str, MAX_STOP_STRINGS, MAX_STOP_CHARS)
        if not all(self.stop):
            raise InvalidParam("stop", "stop strings must not be empty")
        _list(self, "stop_token_ids", int, 1 << 16)
        if any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids):
            raise InvalidParam("stop_token_ids", f"token ids must be in [0, {INT32_MAX}]")
        _float(self, "presence_penalty")
        _float(self, "frequency_penalty")
        _float(self, "repetition_penalty", lo=0, lo_open=True)
        for name in ("ignore_eos", "logprobs", "prompt_logprobs"):
            if type(getattr(self, name)) is not bool:
                raise InvalidParam(name, f"expected a boolean, got {getattr(self, name)!r}")
        _int(self, "top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
        if self.top_logprobs and not self.logprobs:
            raise InvalidParam("top_logprobs", "needs logprobs")
        if not isinstance(self.logit_bias, (list, tuple)) or len(self.logit_bias) > 1 << 16:
            raise InvalidParam("logit_bias", "expected a list of [token_id, bias] pairs")
        object.__setattr__(self, "logit_bias", [_bias_pair(p) for p in self.logit_bias])
        for name in ("grammar_kind", "grammar_spec"):
            if type(getattr(self, name)) is not str:
                raise InvalidParam(name, f"expected a string, got {getattr(self, name)!r}")
        if self.grammar_kind and self.grammar_kind not in GRAMMAR_KINDS:
            raise InvalidParam("grammar_kind", f"must be one of {', '.join(GRAMMAR_KINDS)}")
        if self.grammar_spec and not self.grammar_kind:
            raise InvalidParam("grammar_spec", "needs a grammar_kind")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def to_wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, d: Any) -> "SamplingParams":
        """From a wire map with exactly the field names (any other shape: InvalidParam)."""
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict) or set(d) != set(names):
            got = sorted(map(str, d)) if isinstance(d, dict) else type(d).__name__
            raise InvalidParam("sampling", f"expected the fields {names}, got {got}")
        return cls(**d)


def _bias_pair(pair) -> list:
    """[token_id, bias] with an int id >= 0 and a bias in [-100, 100] (OpenAI's range)."""
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)
            and not isinstance(pair[0], bool) and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool)):
        raise InvalidParam("logit_bias", f"entries must be [token_id, bias], got {pair!r}")
    if pair[0] < 0 or not -100 <= pair[1] <= 100:
        raise InvalidParam("logit_bias", f"token id must be >= 0 and bias in [-100, 100], got {pair!r}")
    return [pair[0], float(pair[1])]
