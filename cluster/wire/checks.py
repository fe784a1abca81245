"""Field checks for decoded wire messages.

A check is a function `(value, path) -> value` that returns the value (possibly
normalised, e.g. an int where a float is expected becomes a float) or raises
`ProtocolError` naming the path of the bad field (`generate.sampling.top_p: ...`).
Checks compose: `List(Int(lo=0))`, `Record({"rid": Str()})`, `Opt(Str())`; `Typed(cls)`
turns a record into one of the wire's frozen item types.
Sizes are bounded everywhere so that a hostile frame cannot make us build huge objects
beyond what msgpack's own limits already allow.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional

Check = Callable[[Any, str], Any]

MAX_STR = 1 << 20          # 1 MiB of text in one field
MAX_ITEMS = 1 << 22        # elements in one list (token ids of a whole batch)
MAX_KEYS = 1 << 16         # keys in one open-ended map (failed rids)
INT32_MAX = (1 << 31) - 1


class ProtocolError(ValueError):
    """A frame or message that does not follow the wire protocol."""


def fail(path: str, why: str) -> None:
    raise ProtocolError(f"{path}: {why}")


def _kind(v: Any) -> str:
    return type(v).__name__


def Str(choices: Optional[Iterable[str]] = None, max_len: int = MAX_STR) -> Check:
    allowed = frozenset(choices) if choices is not None else None

    def check(v: Any, path: str) -> str:
        if not isinstance(v, str):
            fail(path, f"expected str, got {_kind(v)}")
        if len(v) > max_len:
            fail(path, f"string of {len(v)} chars exceeds {max_len}")
        if allowed is not None and v not in allowed:
            fail(path, f"{v[:64]!r} is not one of {sorted(allowed)}")
        return v
    return check


def Int(lo: Optional[int] = None, hi: Optional[int] = None) -> Check:
    def check(v: Any, path: str) -> int:
        if type(v) is not int:                     # bool is an int subclass: refuse it
            fail(path, f"expected int, got {_kind(v)}")
        if lo is not None and v < lo:
            fail(path, f"{v} is below {lo}")
        if hi is not None and v > hi:
            fail(path, f"{v} is above {hi}")
        return v
    return check


def Float(finite: bool = False) -> Check:
    def check(v: Any, path: str) -> float:
        if type(v) not in (int, float):
            fail(path, f"expected float, got {_kind(v)}")
        v = float(v)
        if finite and not math.isfinite(v):
            fail(path, f"{v} is not finite")
        return v
    return check


def Bool() -> Check:
    def check(v: Any, path: str) -> bool:
        if type(v) is not bool:
            fail(path, f"expected bool, got {_kind(v)}")
        return v
    return check


def Number() -> Check:
    """An int or a float, kept as is (gauges)."""
    def check(v: Any, path: str) -> int | float:
        if type(v) not in (int, float):
            fail(path, f"expected int or float, got {_kind(v)}")
        return v
    return check


def Scalar() -> Check:
    """str, int, float or bool (a trace mark's attributes)."""
    text = Str(max_len=4096)

    def check(v: Any, path: str) -> Any:
        if isinstance(v, str):
            return text(v, path)
        if type(v) not in (int, float, bool):
            fail(path, f"expected str/int/float/bool, got {_kind(v)}")
        return v
    return check


def Opt(inner: Check) -> Check:
    def check(v: Any, path: str) -> Any:
        return None if v is None else inner(v, path)
    return check


def List(item: Check, max_len: int = MAX_ITEMS, min_len: int = 0) -> Check:
    """A list (a tuple is accepted and becomes a list)."""
    def check(v: Any, path: str) -> list:
        if not isinstance(v, (list, tuple)):
            fail(path, f"expected list, got {_kind(v)}")
        if not min_len <= len(v) <= max_len:
            fail(path, f"list of {len(v)} items, expected {min_len}..{max_len}")
        try:
            return [item(x, path) for x in v]
        except ProtocolError:
            for i, x in enumerate(v):       # slow path: name the bad index
                item(x, f"{path}[{i}]")
            raise
    return check


_INT_ONLY = frozenset({int})
_STR_ONLY = frozenset({str})


def Strs(max_str: int = MAX_STR, max_len: int = MAX_ITEMS) -> Check:
    """A list of short strings (the request ids of a packed block of rows): checked in C where
    they all are, not one Python call per row."""
    slow = List(Str(max_len=max_str), max_len=max_len)

    def check(v: Any, path: str) -> list:
        if (isinstance(v, list) and len(v) <= max_len and set(map(type, v)) <= _STR_ONLY
                and max(map(len, v), default=0) <= max_str):
            return v
        return slow(v, path)
    return check


def TokenIds(min_len: int = 0) -> Check:
    """A list of token ids: ints in [0, INT32_MAX] (they may travel as an int32 frame)."""
    slow = List(Int(lo=0, hi=INT32_MAX), min_len=min_len)

    def check(v: Any, path: str) -> list[int]:
        # fast path for the common case: a long list of plain ints in range
        if (isinstance(v, (list, tuple)) and min_len <= len(v) <= MAX_ITEMS
                and set(map(type, v)) <= _INT_ONLY        # in C: no Python step per id
                and (not v or (min(v) >= 0 and max(v) <= INT32_MAX))):
            return list(v)
        return slow(v, path)
    return check


def Map(key: Check, value: Check, max_len: int = MAX_KEYS) -> Check:
    def check(v: Any, path: str) -> dict:
        if not isinstance(v, dict):
            fail(path, f"expected map, got {_kind(v)}")
        if len(v) > max_len:
            fail(path, f"map of {len(v)} keys exceeds {max_len}")
        return {key(k, f"{path} key"): value(x, f"{path}.{k}") for k, x in v.items()}
    return check


def _check_keys(v: Any, path: str, names: frozenset) -> None:
    if not isinstance(v, dict):
        fail(path, f"expected map, got {_kind(v)}")
    if v.keys() != names:
        missing, extra = sorted(names - v.keys()), sorted(map(str, v.keys() - names))
        fail(path, f"missing keys {missing}, unexpected keys {extra}")


MAX_PATHS = 256            # a record's field paths kept per parent path (parents are few: lists pass theirs on)


def Record(fields: dict[str, Check]) -> Check:
    """A map with exactly these keys (no missing, no extra)."""
    names = frozenset(fields)
    paths: dict[str, dict[str, str]] = {}            # NOTE: a field's path is built once, not per message

    def check(v: Any, path: str) -> dict:
        _check_keys(v, path, names)
        sub = paths.get(path)
        if sub is None:
            sub = {k: f"{path}.{k}" for k in fields}
            if len(paths) < MAX_PATHS:
                paths[path] = sub
        return {k: c(v[k], sub[k]) for k, c in fields.items()}
    return check


def Typed(cls: type, fields: Optional[dict[str, Check]] = None) -> Check:
    """A frozen dataclass travelling as a map of exactly its fields: the field checks (when
    given), then the type's own `__post_init__`; returns an instance of `cls`. An instance
    (the encoding side) is checked the same way, except that one of a frozen type with no
    field checks here (its own `__post_init__` is the check: SamplingParams) is taken as
    it is: it was checked when it was built (31 us a `generate`, rebuilt for nothing)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if fields is None:                             # the keys alone: no identity check per field
        key_set = frozenset(names)

        def record(v: Any, path: str) -> dict:
            _check_keys(v, path, key_set)
            return v
    else:
        record = Record(fields)
    checks_itself = fields is None and dataclasses.fields(cls) and cls.__dataclass_params__.frozen

    def check(v: Any, path: str) -> Any:
        if isinstance(v, cls):
            if checks_itself:                      # its __post_init__ ran when it was built, and it is frozen
                return v
            v = {n: getattr(v, n) for n in names}
        d = record(v, path)
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            fail(path, str(e))
    return check
