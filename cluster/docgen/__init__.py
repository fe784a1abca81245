"""Reference pages generated from the code, so they cannot drift from it.

- `messages.py` renders docs/reference/messages.md from the wire dataclasses,
- `config.py` renders docs/reference/config.md from the config sections' types,
- `metrics.py` renders docs/reference/metrics.md from the metric declarations,
- `source.py` reads a dataclass's fields with the comments written beside them, and
  writes a page's header.

`python -m cluster.docgen` rewrites every page; `--check` only says which are stale
(tests/test_docs_reference.py runs the same check).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from cluster.docgen.source import REGENERATE  # noqa: F401 (callers import it from here)

REPO = Path(__file__).resolve().parents[2]


def pages() -> dict[str, Callable[[], str]]:
    """Repository path of each generated page -> its renderer."""
    from cluster.docgen import config, messages, metrics
    return {"docs/reference/messages.md": messages.render,
            "docs/reference/config.md": config.render,
            "docs/reference/metrics.md": metrics.render}


def stale_pages(root: Path = REPO) -> list[str]:
    """The pages whose file differs from what the code renders now."""
    out = []
    for path, render in pages().items():
        file = root / path
        if not file.exists() or file.read_text() != render():
            out.append(path)
    return out


def write_pages(root: Path = REPO) -> list[str]:
    """Rewrite every page; -> the ones that changed."""
    changed = []
    for path, render in pages().items():
        file, text = root / path, render()
        if not file.exists() or file.read_text() != text:
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(text)
            changed.append(path)
    return changed
