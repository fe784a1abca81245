"""A dataclass's fields as its source writes them: the comment beside each field (and the
comment lines continuing it), and the header of a page generated from the code."""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
from typing import Any

FIELD_LINE = re.compile(r"\s+(\w+)\s*[:=]")
REGENERATE = "python -m cluster.docgen"


def header(title: str, sources: str) -> str:
    return (f"# {title}\n\n<!-- generated from {sources} by `{REGENERATE}`; edit the code, "
            f"not this page -->\n")


def field_comments(cls: type) -> dict[str, str]:
    """{field (or enum member) name: its comment}: the `# ...` on the field's line, joined with the
    comment-only lines under it (a comment written over several lines)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(cls.__members__)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0] - 1] = tok.string.lstrip("#").strip()
    out, current, leading = {}, None, []
    for i, line in enumerate(lines):
        m = FIELD_LINE.match(line)
        indent = len(line) - len(line.lstrip())
        if m and m.group(1) in names:
            current = m.group(1)
            said = leading + ([comments[i]] if i in comments else [])
            if said:
                out[current] = " ".join(said)
            leading = []
        elif line.strip().startswith("#") and i in comments:
            if current in out and indent > field_indent(lines):
                out[current] += " " + comments[i]        # continues the field's own comment
            else:
                leading.append(comments[i])              # written over the next field
                current = None
        else:
            current, leading = None, []
    return out


def field_indent(lines: list[str]) -> int:
    for line in lines:
        m = FIELD_LINE.match(line)
        if m:
            return len(line) - len(line.lstrip())
    return 0


def class_comment(cls: type) -> str:
    """The comment on the `class X:` line (the wire messages say their direction there)."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return ""
    for line in lines:
        if line.lstrip().startswith("class "):
            return line.split("#", 1)[1].strip() if "#" in line else ""
    return ""


def docstring(cls: type) -> str:
    """The class's own docstring as one paragraph ("" when it has none or only the
    dataclass-generated signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):
        return ""
    return " ".join(inspect.cleandoc(doc).split())


def source_line(cls: type) -> tuple[str, int]:
    """Where the class is defined (module, line): pages list types in source order."""
    try:
        return cls.__module__, inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return cls.__module__, 0


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (built from its factory), or dataclasses.MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def cell(text: str) -> str:
    """Text that keeps a Markdown table row intact."""
    return str(text).replace("|", "\\|").replace("\n", " ")
