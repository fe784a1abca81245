"""The wire's dtype names as torch dtypes, and back. Apart from `tensor_frames.py` so that a
process that only routes (the router and its front ends) never imports torch: it sends
prompt ids as numpy arrays and receives no tensors."""
from __future__ import annotations

import torch

from cluster.wire.tensor_frames import WIRE_DTYPES

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPES}
DTYPE_NAMES: dict[torch.dtype, str] = {d: n for n, d in DTYPES.items()}
