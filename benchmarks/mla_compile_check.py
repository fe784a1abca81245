"""Compile the MLA decode sweep's candidates for an H100 (sm_90a) on a machine without a GPU: Triton
and its bundled ptxas only, no driver. Per candidate: compiled or the error, registers and spilled
bytes (ptxas -v), shared memory, and what the loads and dots became (TMA bulk copies, cp.async,
wgmma or mma.sync): a candidate that fails here would fail in the sweep, and one that spills or
reads no TMA is known before a GPU call is spent on it.

    PYTHONPATH=$PWD python benchmarks/mla_compile_check.py --mla-heads 16 --mla-quick
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.mla_decode_candidates import candidates  # noqa: E402


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def launch_args(cfg, heads: int, rank: int = 512, rope: int = 64, page: int = 16, batch: int = 64, context: int = 2048):
    """The split kernel's (args, kwargs) as decode_latent would launch it for `cfg` (CPU tensors
    stand in: only dtypes, alignment and strides reach the compiler)."""
    from cluster.engine import triton_mla
    kept, recorder = triton_mla._mla_split_kernel, _Recorder()
    triton_mla._mla_split_kernel = recorder
    try:
        per = context // page
        cache = torch.zeros(batch * per, page, rank + rope, dtype=torch.bfloat16)
        q = torch.zeros(batch, heads, rank + rope, dtype=torch.bfloat16)
        triton_mla.decode_latent(q[..., :rank], q[..., rank:], cache, torch.zeros(batch * per, dtype=torch.int64),
                                 torch.zeros(batch, dtype=torch.int64), torch.full((batch,), context), 0.07, cfg)
    finally:
        triton_mla._mla_split_kernel = kept
    return recorder.calls[0]


def compile_for_h100(args, kwargs, arch: int = 90) -> dict:
    """Compile the split kernel for sm_`arch` with these launch arguments -> its figures."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    from cluster.engine.triton_mla import _mla_split_kernel as kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    # the pipeliner's buffers: the depth of each multi-buffered tile (the leading axis of a 3-D allocation);
    # 0: the tiles are not pipelined at all (plain loads into registers, the latency exposed every tile)
    depths = [int(d) for d in re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+)x\d+x\d+x", compiled.asm["ttgir"])]
    out = {"shared_kb": compiled.metadata.shared / 1024, "tma_copies": ptx.count("cp.async.bulk.tensor"),
           "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"), "wgmma": ptx.count("wgmma.mma_async"),
           "mma_sync": ptx.count("mma.sync"), "buffers": max(depths, default=0)}
    out.update(ptxas_figures(ptx, arch))
    return out


def ptxas_figures(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the kernel, from `ptxas -v` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"-arch=sm_{arch}a", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=300).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": regs and int(regs.group(1)), "spill_store_bytes": spill and int(spill.group(1)),
            "spill_load_bytes": spill and int(spill.group(2))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mla-heads", dest="heads", default="16")
    ap.add_argument("--mla-quick", dest="quick", action="store_true")
    ap.add_argument("--only", default="", help="only candidates whose brief contains this text")
    args = ap.parse_args()
    for heads in [int(h) for h in args.heads.split(",")]:
        seen = set()
        for cfg in candidates(heads, args.quick):
            # the split count is a runtime argument: one compile serves every programs_per_sm
            key = dataclasses.replace(cfg, programs_per_sm=2).brief()
            if key in seen or args.only not in cfg.brief():
                continue
            seen.add(key)
            row = {"heads": heads, "config": cfg.brief()}
            try:
                row.update(compile_for_h100(*launch_args(cfg, heads)))
            except Exception as e:  # noqa: BLE001 - a candidate's compile error is its result
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
