"""Shared pieces of the cluster benchmarks: launch a real cluster, stream one request, stats.

    with Cluster(toml_text, "name", env={...}) as c:      # `pdcluster launch` in a subprocess
        r = asyncio.run(stream_completion(c.base_url, prompt, max_tokens=4))
        c.log("decode-0"), c.metrics()

The launcher runs in its own session on a free port with a temp log dir; leaving the
`with` block sends it SIGTERM (the launcher drains and stops every child), then SIGKILLs
the process group and any descendant still alive, so a benchmark never leaks a worker.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdcluster_cmd() -> list[str]:
    script = Path(sys.executable).parent / "pdcluster"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cluster.launch.cli"]


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def disagg_config(base: str = "configs/local.toml", scheduler: Optional[dict] = None,
                  model: Optional[dict] = None) -> str:
    """`base` without its [[dllm]] group, with [scheduler] / [model] keys overridden."""
    lines, skip, section = [], False, ""
    for line in (REPO / base).read_text().splitlines():
        head = line.strip()
        if head.startswith("["):
            skip = head == "[[dllm]]"
            section = head.strip("[]")
        if skip:
            continue
        key = head.split("=", 1)[0].strip() if "=" in head and not head.startswith("#") else None
        overrides = {"scheduler": scheduler or {}, "model": model or {}}.get(section, {})
        if key in overrides:
            continue
        lines.append(line)
        if head in ("[scheduler]", "[model]"):
            for k, v in overrides.items():
                lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines) + "\n"


class Cluster:
    """`pdcluster launch` on a free port; `stop()` (or leaving the `with`) tears it down."""

    def __init__(self, config_toml: str, name: str, env: Optional[dict] = None, timeout_s: float = 300):
        self.dir = tempfile.mkdtemp(prefix=f"pdcluster-bench-{name}-")
        self.log_dir = os.path.join(self.dir, "logs")
        self.config_path = os.path.join(self.dir, "cluster.toml")
        Path(self.config_path).write_text(config_toml)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.out_path = os.path.join(self.dir, "launch.out")
        self.timeout_s = timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.descendants: list[psutil.Process] = []
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                pdcluster_cmd() + ["launch", self.config_path, "--port", str(self.port), "--log-dir", self.log_dir],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True)
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < self.timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"launcher exited {self.proc.returncode}:\n{self.output()}")
                try:
                    if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                        self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                        print(f"  cluster up in {time.monotonic() - t0:.1f}s at {self.base_url} "
                              f"(logs {self.log_dir})", flush=True)
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            raise RuntimeError(f"cluster not healthy after {self.timeout_s:.0f}s:\n{self.output()}")
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        return Path(self.out_path).read_text()[-4000:] if os.path.exists(self.out_path) else ""

    def log(self, worker_id: str) -> str:
        path = Path(self.log_dir) / f"{worker_id}.log"
        return path.read_text() if path.exists() else ""

    def metrics(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.descendants = self.descendants or _children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for p in self.descendants:                 # never leak a worker into the next run
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    print(f"  killing leftover {p.pid} {p.name()}", flush=True)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc = None


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def log_time(line: str) -> Optional[float]:
    """Unix time of a worker log line (`%(asctime)s`: local time, millisecond resolution)."""
    m = LOG_TIME.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} for every sample of `name` in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


async def stream_completion(client, prompt, max_tokens: int, model: Optional[str] = None) -> dict:
    """One streamed greedy completion: wall-clock send / first / last token times, rid, usage."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t_send = time.time()
    arrivals, rid, usage = [], None, {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            rid = rid or event.get("id", "").removeprefix("cmpl-")
            if event.get("usage"):
                usage = event["usage"]
            elif event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or choice.get("finish_reason") is None:
                    arrivals.append(time.time())     # a token chunk (text may be held back)
    return {"rid": rid, "t_send": t_send, "arrivals": arrivals, "t_end": time.time(), "usage": usage}


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
