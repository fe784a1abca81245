"""`linear`: F.linear, routed to oneDNN on CPU for float32.

torch's default CPU float32 GEMM is MKL, which runs its AVX2 code on AMD CPUs (such as
the EPYC these benchmarks run on); oneDNN's matmul picks its kernel by ISA and uses
AVX-512 there: about 2x faster at every shape the model uses (1 to 4096 rows).
`PDCLUSTER_ONEDNN=0` turns it off.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

USE_ONEDNN = (os.environ.get("PDCLUSTER_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    if USE_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0]:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
