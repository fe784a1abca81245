"""Compile the MLA decode sweep's kernels in parallel before it times them (mla_decode_sweep.py
--mla-precompile N): N worker processes each launch their share of the candidates once on the sweep's
own shapes, so every kernel lands in Triton's on-disk cache under the key the sweep's first call looks
up (same specialization: batch, context, head count, whether there is more than one split); the sweep
then loads instead of compiling, one candidate after another. A worker that fails or runs out of time
costs only time: the sweep compiles what is missing itself. Jobs and results travel as JSON.

    python benchmarks/mla_precompile.py JOB_JSON     # one worker (what `precompile` starts)
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_key(cfg):
    """The config with its split count left out (a runtime argument, apart from whether it is one)."""
    return dataclasses.replace(cfg, programs_per_sm=2, num_splits=0)


def broken_contexts(errors: list[dict]) -> set:
    """(heads, compile key brief) of the configs whose launch broke a worker's CUDA context (an illegal
    address, a launch failure): in the sweep's own process they would fail every later candidate. Only
    each worker's first such error counts; the configs after it failed for it."""
    first = {}
    for e in errors:
        if "worker" in e and any(t in e["error"] for t in ("illegal", "launch failure", "CUDA error")):
            first.setdefault(e["worker"], (e["heads"], e["config"]))
    return set(first.values())


def distinct_kernels(work: dict[int, list], batch: int, num_sms: int) -> list[tuple[int, object]]:
    """(heads, config) once per kernel: configs differing only in a split count above one share one."""
    from cluster.engine.triton_mla import head_block
    seen, out = set(), []
    for heads, configs in work.items():
        for cfg in configs:
            blocks = -(-heads // (cfg.block_h or head_block(heads)))
            key = (heads, compile_key(cfg), cfg.splits(batch, blocks, num_sms) > 1)   # one split: no merge
            if key not in seen:
                seen.add(key)
                out.append((heads, cfg))
    return out


def warm(job: dict) -> list[dict]:
    """Worker: one launch of each config of `job` on the sweep's case -> per config its seconds or error."""
    sys.path.insert(0, ROOT)
    import torch

    from benchmarks import mla_decode_sweep as sweep
    if os.environ.get("TRITON_INTERPRET") == "1":
        sweep.interpret_on_cpu()
    from benchmarks.mla_decode_candidates import from_brief
    from cluster.engine.triton_mla import decode_latent
    a, done, cases = job["case"], [], {}
    for heads, brief in job["configs"]:
        cfg = from_brief(brief)
        if heads not in cases:
            cases[heads] = sweep.latent_case(a["batch"], a["context"], heads, a["rank"], a["rope"], a["page_size"],
                                             getattr(torch, a["dtype"]), a["device"])
        q_latent, q_pe, cache, pages, starts, seq_lens, _ = cases[heads]
        t0 = time.perf_counter()
        try:
            decode_latent(q_latent, q_pe, cache, pages, starts, seq_lens, 0.07, cfg)
            if a["device"].startswith("cuda"):
                torch.cuda.synchronize()
            done.append({"heads": heads, "config": brief, "s": round(time.perf_counter() - t0, 2)})
        except Exception as e:  # noqa: BLE001 - the sweep meets the same error and records it
            done.append({"heads": heads, "config": compile_key(cfg).brief(), "worker": job["worker"],
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return done


def precompile(args, work: dict[int, list], workers: int, num_sms: int, timeout_s: float = 240) -> dict:
    """Compile `work` ({heads: configs}) in `workers` processes, round robin over the distinct kernels ->
    {"precompile_s", "precompiled", "precompile_errors"}. Never raises: a worker past `timeout_s` is
    killed and what it left is the sweep's to compile."""
    case = {k: getattr(args, k) for k in ("batch", "context", "rank", "rope", "page_size", "dtype", "device")}
    kernels = distinct_kernels(work, args.batch, num_sms)
    jobs = [{"case": case, "worker": i, "configs": [(h, cfg.brief()) for h, cfg in kernels[i::workers]]}
            for i in range(min(workers, len(kernels)))]
    t0, done, errors = time.perf_counter(), 0, []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    logs = [tempfile.TemporaryFile("w+") for _ in jobs]      # stderr: a full pipe would stall a worker
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(job)], env=env,
                              stdout=subprocess.PIPE, stderr=log, text=True) for job, log in zip(jobs, logs)]
    for proc, log in zip(procs, logs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - t0)))
            rows = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 and out.strip() else []
            done += sum("error" not in r for r in rows)
            errors += [r for r in rows if "error" in r]
            if proc.returncode != 0:
                log.seek(0)
                errors.append({"config": "worker", "error": log.read()[-300:]})
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)
            errors.append({"config": "worker", "error": f"killed after {timeout_s:.0f} s"})
        finally:
            log.close()
    return {"precompile_s": time.perf_counter() - t0, "precompiled": done, "precompile_errors": errors}


if __name__ == "__main__":
    print(json.dumps(warm(json.loads(sys.argv[1]))), flush=True)
