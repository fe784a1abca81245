"""Load a Triton kernel module of cluster/engine under Triton's CPU interpreter (numpy), for the
interpreted kernel tests. TRITON_INTERPRET must be set before triton itself is imported (its
library functions are decorated then), so the first load imports triton interpreted and later
loads in the same process reuse it; None where triton is missing, on CUDA machines (the
compiled kernels are tested there), or where triton was already imported compiled."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

_ENGINE = os.path.join(os.path.dirname(__file__), "..", "cluster", "engine")
_state = {"interpreted": False}


def load_interpreted(module: str):
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return None
    if "triton" in sys.modules and not _state["interpreted"] and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if not _state["interpreted"]:
            from triton.runtime import interpreter
            original = interpreter._patch_lang_tensor

            def patched(tensor, scope):   # numpy 2 refuses int() of the 1-element arrays that hold loaded scalars
                original(tensor, scope)
                scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

            interpreter._patch_lang_tensor = patched
            _state["interpreted"] = True
        spec = importlib.util.spec_from_file_location(f"{module}_interpreted", os.path.join(_ENGINE, f"{module}.py"))
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before


def interpreted_kernels(module: str):
    """A pytest fixture that yields the interpreted module (skips where it could not be loaded)."""
    loaded = load_interpreted(module)

    @pytest.fixture
    def kernels(monkeypatch):
        if loaded is None:
            pytest.skip("needs triton, not yet imported in this process")
        monkeypatch.setenv("TRITON_INTERPRET", "1")   # triton reads it again at launch (lazy imports)
        return loaded
    return kernels
