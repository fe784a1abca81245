"""Launch a real cluster (`pdcluster launch` or `serve`) for integration tests and the
cluster benchmarks (`benchmarks/common.py`), and tear it down.

    c = LaunchedCluster(toml_text, "name", env={...})    # healthy when this returns
    with LaunchedCluster(...) as c: ...                  # or: stopped when the block ends

One cluster per test module: the launcher, the router and every worker are real
processes serving the real default model; tests talk to it with the official client.
The launcher runs in its own session on a free port with a temp log dir; `stop()` sends it
SIGTERM (it drains and stops every child), then SIGKILLs the process group and any
descendant still alive, so nothing leaks into the next module or benchmark run.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable, Optional

import httpx
try:
    import openai
except ImportError:          # GPU hosts without the client: their tests talk httpx
    openai = None
import psutil

from cluster.roles import ROLES

LAUNCH_TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[1]
ITER_LINE = re.compile(r"(Prefill|Decode) batch \[(\d+)\]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pdcluster_cmd() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "pdcluster")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "cluster.launch.cli"]


def _stop_with_test_process() -> None:
    """In the launcher's child: SIGTERM when the test process dies (an OOM kill or a timeout would
    otherwise leave its whole cluster running and holding gigabytes)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def expected_workers(config_toml: str) -> dict[str, int]:
    """Workers per role the config launches. Healthy means all of them registered, not just enough
    to answer 200: a 1P1D cluster with an [slo] is healthy (degraded) with its decode worker alone,
    and a test that starts then would see requests placed as they never are once both are up."""
    groups = tomllib.loads(config_toml)
    return {role: sum(g.get("count", 1) for g in groups.get(role, [])) for role in ROLES}


class LaunchedCluster:
    """`pdcluster launch CONFIG`, or with `serve=True` `pdcluster serve` (config_toml unused)."""

    def __init__(self, config_toml: str, name: str, env: Optional[dict] = None, serve: bool = False,
                 args: tuple = (), timeout_s: float = LAUNCH_TIMEOUT_S):
        self.dir = tempfile.mkdtemp(prefix=f"pdcluster-{name}-")
        self.log_dir = os.path.join(self.dir, "logs")
        self.config_path = os.path.join(self.dir, "cluster.toml")
        with open(self.config_path, "w") as f:
            f.write(config_toml)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.out_path = os.path.join(self.dir, "launch.out")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.expected_workers = {} if serve else expected_workers(config_toml)
        command = ["serve"] if serve else ["launch", self.config_path]
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                pdcluster_cmd() + command + ["--port", str(self.port), "--log-dir", self.log_dir, *args],
                stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True,
                preexec_fn=_stop_with_test_process)
        self.descendants: list[psutil.Process] = []
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.client = None if openai is None else openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=180)

    def __enter__(self) -> "LaunchedCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_healthy(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"launcher exited {self.proc.returncode}:\n{self.output()}")
            try:
                health = httpx.get(self.base_url + "/health", timeout=2)
                registered = health.json().get("workers", {}) if health.status_code == 200 else None
                if registered is not None and all(registered.get(role, 0) >= n
                                                  for role, n in self.expected_workers.items()):
                    self.descendants = psutil.Process(self.proc.pid).children(recursive=True)
                    print(f"cluster up in {time.monotonic() - t0:.1f}s at {self.base_url} "
                          f"(logs {self.log_dir})", file=sys.stderr, flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cluster not healthy after {timeout_s:.0f}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.out_path).read_text()[-4000:] if os.path.exists(self.out_path) else ""

    def log(self, worker_id: str) -> str:
        path = os.path.join(self.log_dir, f"{worker_id}.log")
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()

    def iterations(self, worker_id: str, kind: str) -> list[int]:
        return [int(m.group(2)) for m in ITER_LINE.finditer(self.log(worker_id)) if m.group(1) == kind]

    def worker_pids(self) -> dict[str, int]:
        """worker id -> pid of the live worker processes (rank 0 of tensor-parallel ones; router excluded)."""
        return {wid: pid for (wid, rank), pid in self.rank_pids().items() if rank == 0}

    def rank_pids(self) -> dict[tuple[str, int], int]:
        """(worker id, tensor-parallel rank) -> pid of the live worker processes."""
        out = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
            except psutil.NoSuchProcess:
                continue
            if "--worker-id" in cmd:
                rank = int(cmd[cmd.index("--rank") + 1]) if "--rank" in cmd else 0
                out[cmd[cmd.index("--worker-id") + 1], rank] = p.pid
        return out

    def metrics(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text

    def wait_heartbeats(self, worker_id: str, n: int = 2) -> None:
        wait_heartbeats(lambda: httpx.get(self.base_url + "/admin/workers", timeout=10).json()["workers"],
                        worker_id, n)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> list[psutil.Process]:
        """Signal the launcher; return the descendants still alive afterwards (then killed)."""
        if self.proc.poll() is None:
            self.descendants = self.descendants or _children(self.proc.pid)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        alive = []
        for p in self.descendants:                 # never leak a worker into the next run
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        return alive


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


# Clusters and offline references that tests compare token for token run the float32 reference
# weights: native weights' bfloat16 activations are not batch-invariant (tests/test_quant_linear.py
# measures how close they stay; tests/test_e2e_native_weights.py serves them end to end).
REFERENCE_WEIGHTS = "float32"


def cluster_config(groups: str, scheduler: str = "", extra: str = "", cpu_weights: str = REFERENCE_WEIGHTS,
                   model: str = "") -> str:
    return f"""
[model]
name = "smollm2-135m-instruct"
cpu_weights = "{cpu_weights}"
{model}

[scheduler]
num_pages = 512
max_running_requests = 64
decode_log_interval = 1              # every step's line: tests check each one's iteration
{scheduler}

[timeouts]
register = 240
{extra}

{groups}
"""


def repo_config(name: str, cpu_weights: Optional[str] = None) -> str:
    """The text of `configs/<name>.toml` (what users launch); `cpu_weights` set in its [model] if given."""
    text = (REPO / "configs" / f"{name}.toml").read_text()
    if cpu_weights is None:
        return text
    setting = f'cpu_weights = "{cpu_weights}"\n'
    return text.replace("[model]\n", "[model]\n" + setting, 1) if "[model]\n" in text else "[model]\n" + setting + text


@functools.lru_cache(maxsize=None)
def reference_llm(cpu_weights: str = REFERENCE_WEIGHTS):
    """The offline engine clusters are compared with, one per weights mode for the whole session
    (it keeps no state between `generate` calls): each module loading its own cost seconds. 256
    pages: 4k tokens, plenty for tests' prompts; the default pool is 3 GB of a shared box."""
    from cluster.engine.llm import LLM
    return LLM(num_pages=256, cpu_weights=cpu_weights)


def offline_greedy(prompts: list[str], max_tokens: int, cpu_weights: str = REFERENCE_WEIGHTS):
    """(token ids per prompt, tokenizer) from the offline engine: what a cluster must answer."""
    from cluster.sampling_params import SamplingParams
    llm = reference_llm(cpu_weights)
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens))
    return {p: o.token_ids for p, o in zip(prompts, outs)}, llm.tokenizer


def wait_heartbeats(workers: Callable[[], list], worker_id: str, n: int = 2, timeout_s: float = 60.0) -> None:
    """Return once the router has heard `n` more heartbeats from idle `worker_id` (its
    seconds_since_heartbeat in `workers()`, GET /admin/workers, fell n times): the gauges then hold
    what it had counted before the call. A sleep of about a heartbeat interval is a guess that a
    heartbeat late on loaded cores beats."""
    def since() -> float:
        return next(w["seconds_since_heartbeat"] for w in workers() if w["worker_id"] == worker_id)
    deadline, last, heard = time.monotonic() + timeout_s, since(), 0
    while heard < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{worker_id}: {heard} of {n} heartbeats in {timeout_s:.0f} s")
        time.sleep(0.1)
        now = since()
        heard, last = heard + (now <= last), now
