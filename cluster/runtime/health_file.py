"""A worker's liveness file, for probes that cannot speak ZeroMQ (Kubernetes exec probes).

Workers have no HTTP port; with `--health-file PATH` a worker rewrites PATH every heartbeat
interval from the moment it has loaded its model and registered, for as long as its
scheduler runs. The probe side is this module's `main`:

    python -m cluster.runtime.health_file PATH --max-age S     # exit 0 while PATH is fresh

It imports nothing heavy, so a probe every few seconds costs a bare interpreter start.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Callable


def touch(path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{time.time():.3f}\n")
    os.replace(tmp, path)              # a probe never reads a half-written file


def age_s(path: str, now: float | None = None) -> float:
    """Seconds since the worker last wrote PATH; inf when it never did."""
    try:
        return (time.time() if now is None else now) - os.stat(path).st_mtime
    except OSError:
        return float("inf")


def start_writer(path: str, is_running: Callable[[], bool], interval: float) -> threading.Thread:
    def beat() -> None:
        while is_running():
            try:
                touch(path)
            except OSError:            # a full /tmp must not kill the worker; the probe fails
                pass
            time.sleep(interval)
    t = threading.Thread(target=beat, name="health-file", daemon=True)
    t.start()
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.runtime.health_file",
                                 description="exit 0 while a worker's health file is fresh")
    ap.add_argument("path")
    ap.add_argument("--max-age", type=float, default=30.0, help="seconds (default 30)")
    args = ap.parse_args(argv)
    age = age_s(args.path)
    if age <= args.max_age:
        return 0
    print(f"{args.path}: {'missing' if age == float('inf') else f'{age:.0f} s old'}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
