"""LazyTensors: the tensors of safetensors files, each read only when asked (memory-mapped), so a
tensor-parallel rank reads one full parameter at a time to cut its slice instead of holding the
whole model (`LlamaModel.load_hf_shards`)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch


class LazyTensors(Mapping):
    def __init__(self, files: list[str], rename: Optional[Callable[[str], Optional[str]]] = None):
        from safetensors import safe_open
        self._where: dict[str, tuple] = {}
        for f in files:
            handle = safe_open(f, framework="pt")
            for name in handle.keys():
                key = rename(name) if rename is not None else name
                if key is not None:
                    self._where[key] = (handle, name)

    def renamed(self, rename: Callable[[str], Optional[str]]) -> "LazyTensors":
        """The same tensors under `rename`'s names (None: left out)."""
        out = LazyTensors([])
        out._where = {k2: v for k, v in self._where.items() if (k2 := rename(k)) is not None}
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, stored = self._where[name]
        return handle.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
