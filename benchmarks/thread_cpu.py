"""CPU seconds per thread of a few processes, read from /proc (the scheduler's exact run time, not
the tick-sampled user and system times), and thread names
from `py-spy dump` where py-spy is installed (Python 3.11 does not name its threads for the OS):
what cpu_cluster.py's `--cpu-window` reports per process and per thread."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def thread_seconds(pid: int) -> dict[int, float]:
    """tid -> CPU seconds every thread of `pid` has run (schedstat; exited threads are gone)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) / 1e9
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def thread_names(pid: int) -> dict[int, str]:
    """tid -> Python thread name ("MainThread", "io-control-server"...); native threads (OpenMP,
    ZeroMQ's) by their OS name; {} names only the OS's when py-spy is missing."""
    names = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names[int(tid)] = f.read().strip()
        except FileNotFoundError:
            pass
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(spy):
        try:
            dump = subprocess.run([spy, "dump", "--nonblocking", "-p", str(pid)], capture_output=True,
                                  text=True, timeout=30).stdout
        except subprocess.TimeoutExpired:
            dump = ""
        for m in re.finditer(r'Thread (\d+) \([^)]*\): "([^"]+)"', dump):
            names[int(m.group(1))] = m.group(2)
    return names


def per_token_us(before: dict[int, float], after: dict[int, float], names: dict[int, str],
                 tokens: int) -> dict[str, float]:
    """Each thread's CPU growth in µs per token, keyed by name (same-named threads summed), and
    "total"; threads under 1 µs a token are folded into "rest"."""
    grown: dict[str, float] = {}
    for tid, s in after.items():
        name = names.get(tid, "native")
        grown[name] = grown.get(name, 0.0) + s - before.get(tid, 0.0)
    out = {"total": round(sum(grown.values()) / tokens * 1e6, 1)}
    for name, s in sorted(grown.items(), key=lambda kv: -kv[1]):
        us = s / tokens * 1e6
        key = name if us >= 1 else "rest"
        out[key] = round(out.get(key, 0.0) + us, 1)
    return out
