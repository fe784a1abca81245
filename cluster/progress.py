"""Progress bars for long jobs (model loading, `pdcluster bench`): tqdm on stderr when it is
a terminal, nothing otherwise, so log files and pipes stay clean (the loaders also log
their progress as lines)."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


class ProgressBar:
    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(items: Iterable[T], total: Optional[int], desc: str, unit: str = "it") -> Iterator[T]:
    """`items`, advancing a bar (on a terminal) as each is taken."""
    bar = ProgressBar(total or 0, desc, unit)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
