"""Launch a real cluster (`pdcluster launch`) for integration tests, and tear it down.

One cluster per test module: the launcher, the router and every worker are real
processes serving the real default model; tests talk to it with the official client.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

import httpx
import openai
import psutil

LAUNCH_TIMEOUT_S = 300
ITER_LINE = re.compile(r"(Prefill|Decode) batch \[(\d+)\]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdcluster_cmd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "pdcluster")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "cluster.launch.cli"]


class LaunchedCluster:
    """`pdcluster launch CONFIG`, or with `serve=True` `pdcluster serve` (config_toml unused)."""

    def __init__(self, config_toml: str, name: str, env: Optional[dict] = None, serve: bool = False,
                 args: tuple = ()):
        self.dir = tempfile.mkdtemp(prefix=f"pdcluster-{name}-")
        self.log_dir = os.path.join(self.dir, "logs")
        self.config_path = os.path.join(self.dir, "cluster.toml")
        with open(self.config_path, "w") as f:
            f.write(config_toml)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.out_path = os.path.join(self.dir, "launch.out")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        command = ["serve"] if serve else ["launch", self.config_path]
        self.proc = subprocess.Popen(
            pdcluster_cmd() + command + ["--port", str(self.port), "--log-dir", self.log_dir,
                                         *args],
            stdout=open(self.out_path, "w"), stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        self.descendants: list[psutil.Process] = []
        self._wait_healthy()
        self.client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=180)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"cluster not healthy after {LAUNCH_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        with open(self.out_path) as f:
            return f.read()[-4000:]

    def log(self, worker_id: str) -> str:
        path = os.path.join(self.log_dir, f"{worker_id}.log")
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()

    def iterations(self, worker_id: str, kind: str) -> list[int]:
        return [int(m.group(2)) for m in ITER_LINE.finditer(self.log(worker_id)) if m.group(1) == kind]

    def worker_pids(self) -> dict[str, int]:
        """worker id -> pid of the live worker processes (router excluded)."""
        out = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--worker-id" in cmd:
                out[cmd[cmd.index("--worker-id") + 1]] = p.pid
        return out

    def metrics(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> list[psutil.Process]:
        """Signal the launcher; return the descendants still alive afterwards."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        alive = [p for p in self.descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:                     # never leak processes into the next module
            p.kill()
        return alive


def cluster_config(groups: str, scheduler: str = "", extra: str = "") -> str:
    return f"""
[model]
name = "smollm2-135m-instruct"

[scheduler]
num_pages = 512
max_running_requests = 64
{scheduler}

[timeouts]
register = 240
{extra}

{groups}
"""
