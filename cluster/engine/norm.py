"""RMSNorm, shared by the decoder layers (model.py) and latent attention (mla.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's `weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)`: torch's rms_norm computes in
        # float32 and rounds once like it (bit-identical on CPU); on CUDA one fused kernel instead of six.
        # In float32 the weight goes in too (one op fewer, same product); below it, HF rounds before it.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)
