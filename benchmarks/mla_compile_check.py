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

from benchmarks.mla_decode_candidates import candidates, from_brief  # noqa: E402


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def launch_args(cfg, heads: int, rank: int = 512, rope: int = 64, page: int = 16, batch: int = 64, context: int = 2048,
                num_sms: int = 132):
    """The split kernel's (args, kwargs) as decode_latent would launch it for `cfg` on an H100's `num_sms`
    SMs (the split count decides whether the kernel merges; CPU tensors stand in: only dtypes, alignment
    and strides reach the compiler)."""
    from cluster.engine import triton_mla
    kept, kept_sms, recorder = triton_mla._mla_split_kernel, triton_mla._num_sms, _Recorder()
    triton_mla._mla_split_kernel, triton_mla._num_sms = recorder, lambda device: num_sms
    try:
        per = context // page
        cache = torch.zeros(batch * per, page, rank + rope, dtype=torch.bfloat16)
        q = torch.zeros(batch, heads, rank + rope, dtype=torch.bfloat16)
        triton_mla.decode_latent(q[..., :rank], q[..., rank:], cache, torch.zeros(batch * per, dtype=torch.int64),
                                 torch.zeros(batch, dtype=torch.int64), torch.full((batch,), context), 0.07, cfg)
    finally:
        triton_mla._mla_split_kernel, triton_mla._num_sms = kept, kept_sms
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
    out["per_sm"] = programs_per_sm(out["registers"] or 255, compiled.metadata.num_warps, compiled.metadata.shared)
    return out


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """Programs of this kernel an H100 SM holds at once: 65,536 registers (each warp's allotted in units
    of 256), 228 KB of shared memory (1 KB more reserved per program), 64 warps."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(65536 // (per_warp * warps), (228 * 1024) // (shared + 1024), 64 // warps, 32)


def waves(cfg, per_sm: int, heads: int, batch: int = 64, num_sms: int = 132) -> dict:
    """The grid decode_latent launches for `cfg` on an H100 and how many waves of resident programs it
    takes: more than one wave leaves the second's programs waiting for a first one to finish."""
    from cluster.engine.triton_mla import head_block
    blocks = -(-heads // (cfg.block_h or head_block(heads)))
    programs = batch * blocks * cfg.splits(batch, blocks, num_sms)
    return {"programs": programs, "waves": -(-programs // (per_sm * num_sms)) if per_sm else None}


def ptxas_figures(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of the kernel, from `ptxas -v` (Triton's bundled ptxas), and the spill
    instructions in its main loop (SASS from cuobjdump): spills outside it cost about once per program."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", path, "-o", cubin],
                             capture_output=True, text=True, timeout=300).stderr
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              timeout=300).stdout if os.path.exists(cuobjdump) else None
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": regs and int(regs.group(1)), "spill_store_bytes": spill and int(spill.group(1)),
            "spill_load_bytes": spill and int(spill.group(2)), "loop_spills": sass and loop_spills(sass)}


def loop_spills(sass: str) -> int:
    """Local-memory loads and stores (STL / LDL: spills) in the main loop: between a conditional backward
    branch and its target, the first loop with the most tensor-core instructions (the walk over whole
    tiles; the last partial tile's loop and the merge's run once or not at all)."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    # conditional back edges only: the unconditional ones return from out-of-line barrier waits
    loops = [(int(t, 16), a) for a, op in code for t in re.findall(r"^@!?U?P\w+ BRA(?:\.U)? 0x([0-9a-f]+)", op)
             if int(t, 16) < a]
    if not loops:
        return 0

    def count(pattern, lo, hi):
        return sum(1 for a, op in code if lo <= a <= hi and re.search(pattern, op))
    lo, hi = max(loops, key=lambda loop: count(r"\bH(G)?MMA", *loop))
    return count(r"\b(STL|LDL)\b", lo, hi)


def check(cfg, heads: int) -> dict:
    """One candidate's row: its compile figures (or the error) and its grid's waves."""
    row = {"heads": heads, "config": cfg.brief()}
    try:
        row.update(compile_for_h100(*launch_args(cfg, heads)))
        row.update(waves(cfg, row["per_sm"], heads))
    except Exception as e:  # noqa: BLE001 - a candidate's compile error is its result
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mla-heads", dest="heads", default="16")
    ap.add_argument("--mla-quick", dest="quick", action="store_true")
    ap.add_argument("--only", default="", help="only candidates whose brief contains this text")
    ap.add_argument("--config", action="append", default=[], help="a config as its brief (block_n=16,tma_pages=True) "
                    "instead of the candidates; repeatable")
    args = ap.parse_args()
    for heads in [int(h) for h in args.heads.split(",")]:
        configs = [from_brief(b) for b in args.config] or candidates(heads, args.quick)
        compiled = {}
        for cfg in configs:
            if args.only not in cfg.brief():
                continue
            # the split count is a runtime argument: one compile serves every programs_per_sm
            key = dataclasses.replace(cfg, programs_per_sm=2, num_splits=0)
            if key not in compiled:
                compiled[key] = check(cfg, heads)
                row = compiled[key]
            else:
                row = {**compiled[key], "config": cfg.brief(), **waves(cfg, compiled[key].get("per_sm", 0), heads)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
