"""docs/reference/messages.md: every wire message and nested item, from the dataclasses of
cluster/wire/messages.py and the items it re-exports (the codec in cluster/wire/protocol.py
checks them)."""
from __future__ import annotations

import dataclasses
import enum
import typing

from cluster.docgen.source import cell, class_comment, default_of, docstring, field_comments, header, source_line
from cluster.wire import messages, protocol

INTRO = """\
Every message is a list of ZeroMQ frames. Frame 0 is a msgpack map `{"v": %(version)d, "type": T,
...fields}`; tensors (KV caches, token-id lists over %(inline)d ids) follow as extra frames that
the body describes by dtype, shape and frame index, never as bytes inside the map.
`cluster.wire.protocol.encode(msg)` and `decode(frames)` check the exact key set, every field's
type and range and every tensor's dtype, shape and byte count; anything malformed is one
`ProtocolError`, which the transport logs, counts (`protocol_errors_total`) and drops. Pickle
is never used.

Router <-> worker messages travel on the control plane (the router's ROUTER socket, one
DEALER per worker); prefill <-> decode messages on the data plane (a ROUTER socket per
worker). Fields are listed in wire order; a field with a default may be left at it.
"""


def _messages() -> list[type]:
    return sorted(typing.get_args(messages.Message), key=source_line)


def _nested() -> list[type]:
    """Items that travel inside messages: the wire's dataclasses without a TYPE, in the
    order protocol.__all__ names them."""
    found = [getattr(protocol, name) for name in protocol.__all__]
    return sorted((t for t in found if dataclasses.is_dataclass(t) and not hasattr(t, "TYPE")), key=source_line)


def _enums() -> list[type]:
    """The enumerations the wire modules define, in source order."""
    found = {v for v in vars(messages).values() if isinstance(v, type) and issubclass(v, enum.Enum)
             and v.__module__.startswith("cluster.wire.")}
    return sorted(found, key=source_line)


def _default(f: dataclasses.Field) -> str:
    value = default_of(f)
    return "required" if value is dataclasses.MISSING else f"`{value!r}`"


def _fields_table(cls: type) -> list[str]:
    notes = field_comments(cls)
    rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name == "TYPE":
            continue
        rows.append(f"| `{f.name}` | `{cell(f.type)}` | {_default(f)} | {cell(notes.get(f.name) or f.metadata.get('help', ''))} |")
    return rows


def _section(title: str, cls: type, lead: str = "") -> list[str]:
    out = [f"## {title}", ""]
    for text in (lead, docstring(cls)):
        if text:
            out += [text, ""]
    return out + _fields_table(cls) + [""]


def render() -> str:
    out = [header("Wire messages", "cluster/wire/messages.py"),
           INTRO % {"version": protocol.PROTOCOL_VERSION, "inline": protocol.INLINE_IDS},
           "| type | dataclass | direction |", "| --- | --- | --- |"]
    for cls in _messages():
        out.append(f"| [`{cls.TYPE}`](#{cls.TYPE}) | `{cls.__name__}` | {cell(class_comment(cls))} |")
    out.append("")
    for cls in _messages():
        direction = class_comment(cls)
        out += _section(cls.TYPE, cls, f"Direction: {direction}." if direction else "")
    out += ["# Nested items", "", "Typed like the messages that hold them; a decoded message holds "
            "these types, never loose maps.", ""]
    for cls in _nested():
        out += _section(cls.__name__, cls)
    enums = _enums()
    if enums:
        out += ["# Enumerations", "", "Fields of these types travel as the value text.", ""]
    for cls in enums:
        notes = field_comments(cls)
        out += [f"## {cls.__name__}", "", *([docstring(cls), ""] if docstring(cls) else []),
                "| value | meaning |", "| --- | --- |",
                *(f"| `{m.value}` | {cell(notes.get(m.name, ''))} |" for m in cls), ""]
    return "\n".join(out).rstrip("\n") + "\n"
