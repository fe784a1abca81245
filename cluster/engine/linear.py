"""`linear`: F.linear, routed to oneDNN on CPU for float32, and to packed kernels for GGUF weights.

torch's default CPU float32 GEMM is MKL, which runs its AVX2 code on AMD CPUs (such as
the EPYC these benchmarks run on); oneDNN's matmul picks its kernel by ISA and uses
AVX-512 there: about 2x faster at every shape the model uses (1 to 4096 rows).
`PDCLUSTER_ONEDNN=0` turns it off.

A weight loaded with `cpu_weights = "native"` carries `weight.packed` (quant_linear.PackedWeight):
its GGUF quantization packed for torch's int4/int8 kernels; the tensor itself holds the same
values in float32, the source of the bfloat16 copy that forwards too large for the kernels use.

Inside `small_ops_on_one_thread()` (a small CPU decode step, model_runner.py) only these weight
matmuls run on all torch threads; the ~1,000 small ops between them (norms, rotary, attention
over a few hundred keys) run on one: their parallel regions cost more in fork and join than they
save, and each one waits for every thread, so on a shared machine (the router, the client, other
processes) one thread that lost its core stalls the whole step (BENCHMARKS.md, "CPU threads").
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cluster.engine.quant_linear import packed_linear

USE_ONEDNN = (os.environ.get("PDCLUSTER_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_matmul_threads = 0   # > 0 inside small_ops_on_one_thread: the torch threads a weight matmul gets


@contextmanager
def small_ops_on_one_thread():
    """One torch thread for everything but the weight matmuls, which keep the threads set on entry.
    Forwards run on one thread (forward_executor.py), so a module-level setting is enough."""
    global _matmul_threads
    n = torch.get_num_threads()
    if n == 1 or _matmul_threads:
        yield
        return
    _matmul_threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        _matmul_threads = 0
        torch.set_num_threads(n)


def matmul_threads() -> int:
    """The torch threads a weight matmul gets inside `small_ops_on_one_thread` (0 outside it: leave them)."""
    return _matmul_threads


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, residual=None) -> torch.Tensor:
    """`x @ weight.T + bias`, plus `residual` when given (a packed weight's bfloat16 output then adds into
    it directly: the same float32 sum without a float32 copy of the output first)."""
    if not _matmul_threads:
        return _linear(x, weight, bias, residual)
    torch.set_num_threads(_matmul_threads)   # < 1 us each way
    try:
        return _linear(x, weight, bias, residual)
    finally:
        torch.set_num_threads(1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias=None, residual=None) -> torch.Tensor:
    packed = weight.__dict__.get("packed")   # plain dict read: a per-matmul getattr on a tensor is slower
    if packed is not None and x.shape[0] and x.device.type == "cpu":
        out = packed_linear(x, weight, packed, bias, _dense, out_float=residual is None)
    else:
        out = _dense(x, weight, bias)
    return out if residual is None else residual + out


def _dense(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    if USE_ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0]:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
