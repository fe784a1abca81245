"""Config keys that carry their own help and bounds, and the one check that reads them.

Each section of `config_types.py` is a `Section` that declares its keys with
`option(default, help, ...)`; its `__post_init__` calls `check_fields(self)`, so a section
built in code is checked exactly like one read from TOML (the loader only parses and names
the file and key). The metadata a key carries (`help`, `lo`, `hi`, `gt`, `choices`, `pattern`
+ `form`, `nonempty`) is what the check reads and what a reference page prints, so a key's
documentation cannot drift from its check. Adding a validated key is one `option(...)` line
on its section.
"""
from __future__ import annotations

import functools
import re
import typing
from dataclasses import MISSING, Field, field, fields
from types import NoneType
from typing import Any, Optional, Union


class ConfigError(ValueError):
    """A config value that cannot be served: where it came from (the file, or the section type
    for one built in code), the key path (`decode[0].num_pages`) and the reason."""

    def __init__(self, source: str, key: str, reason: str):
        super().__init__(source, key, reason)      # args rebuild it (copies)
        self.source, self.key, self.reason = source, key, reason

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.reason}"

    def within(self, source: str, prefix: str) -> "ConfigError":
        """This error re-told for a key under `prefix` of the file `source`."""
        return ConfigError(source, f"{prefix}.{self.key}" if prefix else self.key, self.reason)


def option(default: Any = MISSING, help: str = "", *, factory=None, lo=None, hi=None, gt=None,
           choices: Optional[tuple] = None, pattern: Optional[str] = None, form: str = "",
           nonempty: bool = False):
    """A config key: its default, a one-line help and the bounds `check_fields` enforces."""
    bounds = dict(lo=lo, hi=hi, gt=gt, choices=choices, pattern=pattern, form=form or None,
                  nonempty=nonempty or None)
    meta = {"help": help, **{k: v for k, v in bounds.items() if v is not None}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: Field) -> Any:
    """A field's default value (MISSING for a required one)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def type_name(kind) -> str:
    """How a key's type reads in an error and on a reference page."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        kinds = [a for a in args if a is not NoneType]
        if set(kinds) == {bool, str}:
            return "true, false or a string"
        return " or ".join(type_name(a) for a in kinds)
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    return getattr(kind, "__name__", str(kind))


def _fits(value, kind) -> tuple[bool, Any]:
    """(does `value` have type `kind`, the value coerced): an int is a float, a list a tuple,
    and a bool is never an int."""
    if kind is int:
        return type(value) is int, value
    if kind is float:
        ok = type(value) in (int, float)
        return ok, float(value) if ok else value
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:
        if value is None:
            return NoneType in args, value
        for a in args:
            ok, coerced = _fits(value, a)
            if ok:
                return True, coerced
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [_fits(v, args[0]) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    return isinstance(value, kind), value


def _show(choices: tuple) -> str:
    """Choices as TOML writes them: true / false, strings bare unless mixed with booleans."""
    mixed = any(isinstance(c, bool) for c in choices)
    return ", ".join(str(c).lower() if isinstance(c, bool) else f'"{c}"' if mixed else str(c)
                     for c in choices)


def _bound_error(value, m) -> Optional[str]:
    if m.get("nonempty") and not value:
        return "must not be empty"
    if "choices" in m and value not in m["choices"]:
        return f"{value!r} is not one of {_show(m['choices'])}"
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"must be in {lo}..{hi}, got {value}"
    if lo is not None and value < lo:
        return f"must be >= {lo}, got {value}"
    if hi is not None and value > hi:
        return f"must be <= {hi}, got {value}"
    if "gt" in m and not value > m["gt"]:
        return f"must be > {m['gt']}, got {value}"
    if "pattern" in m and re.fullmatch(m["pattern"], value) is None:
        return f"{value!r} is not {m.get('form', 'of the form ' + m['pattern'])}"
    return None


class Section:
    """Base of a config section: checks its keys on construction (a section with checks that
    span keys defines its own `__post_init__`, calling `check_fields` first)."""
    __slots__ = ()

    def __post_init__(self) -> None:
        check_fields(self)


def check_fields(obj, source: Optional[str] = None) -> None:
    """Check every key of the section `obj` against its type and declared bounds (coercing an
    int to a float, a list to a tuple); ConfigError(source or the section's type, key, reason)."""
    source = source or type(obj).__name__
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        ok, value = _fits(value, hints[f.name])
        if not ok:
            raise ConfigError(source, f.name, f"expected {type_name(hints[f.name])}, "
                              f"got {type(value).__name__} {value!r}")
        object.__setattr__(obj, f.name, value)
        reason = _bound_error(value, f.metadata) if value is not None else None
        if reason:
            raise ConfigError(source, f.name, reason)
