"""What the Ray backend adds to a launch: `pdcluster launch configs/local.toml` with the
local launcher and with `--backend ray` (a local Ray started by the launcher), alternated.

    python benchmarks/ray_startup.py [--rounds 2] [--config configs/local.toml]

Per launch: seconds from the command to "pdcluster: serving" (every worker registered), the
Ray part of it from launcher.log (`ray.init`, placement group), and seconds from SIGTERM
to the launcher's exit (drain, actors, Ray shutdown). Medians over rounds.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, free_port, machine, now_utc, pdcluster_cmd  # noqa: E402

RAY_LINE = re.compile(r"ray startup: ray_init ([\d.]+) s, placement_group ([\d.]+) s")


def launch_once(config: str, backend: str, timeout_s: float = 600) -> dict:
    log_dir = tempfile.mkdtemp(prefix=f"pdcluster-bench-{backend}-")
    out_path = os.path.join(log_dir, "launch.out")
    args = ["launch", config, "--port", str(free_port()), "--log-dir", log_dir, "--backend", backend]
    t0 = time.monotonic()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(pdcluster_cmd() + args, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while "pdcluster: serving" not in Path(out_path).read_text():
            if proc.poll() is not None or time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{backend} launch failed:\n{Path(out_path).read_text()[-3000:]}")
            time.sleep(0.1)
        ready_s = time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        stop_s = time.monotonic() - t1
    m = RAY_LINE.search(Path(log_dir, "launcher.log").read_text())
    return {"ready_s": ready_s, "stop_s": stop_s, "ray_init_s": float(m.group(1)) if m else 0.0,
            "placement_s": float(m.group(2)) if m else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config", default="configs/local.toml")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for i in range(args.rounds):
        for backend in ("local", "ray"):
            r = launch_once(args.config, backend)
            runs[backend].append(r)
            print(f"round {i + 1} {backend}: " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()),
                  flush=True)
    med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in runs.items()}
    print(f"\n{machine()}, {now_utc()}, {args.config}, median of {args.rounds} round(s):")
    print("| backend | ready (s) | of which ray.init | placement group | stop (s) |")
    print("|---|---|---|---|---|")
    for b, m in med.items():
        print(f"| {b} | {m['ready_s']:.1f} | {m['ray_init_s']:.1f} | {m['placement_s']:.2f} | {m['stop_s']:.1f} |")
    print(f"Ray adds {med['ray']['ready_s'] - med['local']['ready_s']:+.1f} s to startup and "
          f"{med['ray']['stop_s'] - med['local']['stop_s']:+.1f} s to shutdown")


if __name__ == "__main__":
    main()
