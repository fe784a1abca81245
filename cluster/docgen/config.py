"""docs/reference/config.md: every config key with its type, default, bounds and help, from
the section dataclasses of cluster/config_types.py (a key's `help` and bounds are its field
metadata; a key without them is described by the comment beside it)."""
from __future__ import annotations

import dataclasses
import typing
from types import NoneType

from cluster.config_types import ClusterConfig, WorkerGroup
from cluster.docgen.source import cell, default_of, docstring, field_comments, header
from cluster.roles import ROLES

INTRO = """\
A cluster is one TOML file (`pdcluster launch CONFIG`); every section is optional and every
key has the default below. Each `[section]` is a frozen dataclass of `cluster/config_types.py`;
`cluster/config.py` parses the file into them, and an unknown key or a bad value is an error
naming the file, the key path (`decode[0].num_pages`) and the reason. Worker groups are arrays
of tables, one per group: `[[prefill]]`, `[[decode]]`, `[[unified]]`, `[[dllm]]`. With no group
table the cluster is one prefill and one decode worker.
"""


def type_name(kind) -> str:
    """A key's type as TOML users read it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        kinds = [a for a in args if a is not NoneType]
        name = " or ".join(type_name(a) for a in kinds)
        return name + (" (optional)" if NoneType in args else "")
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    return {str: "string", int: "integer", float: "float", bool: "boolean"}.get(kind, getattr(kind, "__name__", str(kind)))


def toml_value(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple):
        return f"`[{', '.join(str(v) for v in value)}]`"
    return f"`{value}`"


def bounds(meta) -> str:
    parts = []
    if meta.get("nonempty"):
        parts.append("not empty")
    if "choices" in meta:
        parts.append("one of " + ", ".join(f"`{toml_value(c).strip('`')}`" for c in meta["choices"]))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        parts.append(f"{lo} .. {hi}")
    elif lo is not None:
        parts.append(f">= {lo}")
    elif hi is not None:
        parts.append(f"<= {hi}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if "pattern" in meta:
        parts.append(meta.get("form") or f"matches `{meta['pattern']}`")
    return "; ".join(parts)


def _rows(cls: type, skip=()) -> tuple[list[str], list[type]]:
    """One row per key of `cls`; a nested `[section]` is named, not listed (-> nested), and a
    nested type that is no section (a group's DllmParams) has its keys flat in the table."""
    hints, notes = typing.get_type_hints(cls), field_comments(cls)
    rows, nested = [], []
    section_types = {kind for _, kind in sections()}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            if hints[f.name] in section_types:
                nested.append(hints[f.name])
            else:
                rows += _rows(hints[f.name])[0]
            continue
        meaning = f.metadata.get("help") or notes.get(f.name, "")
        rows.append(f"| `{f.name}` | {type_name(hints[f.name])} | {toml_value(default_of(f))} | "
                    f"{cell(bounds(f.metadata))} | {cell(meaning)} |")
    return rows, nested


def _table(cls: type, skip=()) -> list[str]:
    rows, nested = _rows(cls, skip)
    out = ["| key | type | default | bounds | meaning |", "| --- | --- | --- | --- | --- |"] + rows + [""]
    names = {kind: name for name, kind in sections()}
    for kind in nested:
        where = f"`[{names[kind]}]`" if kind in names else f"`{kind.__name__}`"
        out += [f"Every key of {where} may also be set in this table; it overrides that key for "
                "this group only.", ""]
    return out


def sections() -> list[tuple[str, type]]:
    """(TOML name, type) of every `[section]`: the dataclass fields of ClusterConfig."""
    hints = typing.get_type_hints(ClusterConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(ClusterConfig)
            if dataclasses.is_dataclass(hints[f.name])]


def render() -> str:
    out = [header("Config keys", "cluster/config_types.py"), INTRO]
    for name, cls in sections():
        out += [f"## [{name}]", ""]
        if docstring(cls):
            out += [docstring(cls), ""]
        out += _table(cls)
    groups = ", ".join(f"`[[{role}]]`" for role in ROLES)
    out += ["## Worker groups", "", f"{groups}: one table per group of workers of that role "
            "(`count` workers, ids `ROLE-0`, `ROLE-1`, ...).", ""]
    out += _table(WorkerGroup, skip=("role",))
    return "\n".join(out).rstrip("\n") + "\n"
