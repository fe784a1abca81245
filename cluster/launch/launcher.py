"""Launcher: spawns and supervises one cluster's processes on this host (psutil).

Order: pick a concrete control port (when `router.control` uses port 0), start the router
and every worker of the config, wait for the router's HTTP side, wait until all registered
(`timeouts.register`; on failure name the worker, print the tail of its log, stop
everything, exit 1), print the URL, then supervise:
- a worker exits -> the router hears it at once (`POST /internal/workers/{id}/exit`), and
  with `recovery.restart_workers` it is restarted with backoff (1 s, 2 s, 4 s ... 30 s),
  at most MAX_RESTARTS times; the restarted worker registers under the same id;
- the router exits -> everything stops, exit 1.
SIGTERM / SIGINT: SIGTERM to the router (it stops admitting and drains), wait for it, then
SIGTERM to every worker, SIGKILL after KILL_AFTER_S (children: `child_process.py`).
Logs: DIR/<worker-id>.log, DIR/router.log, DIR/launcher.log.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import sys
import time
from typing import Optional

import httpx

from cluster.launch.child_process import Child, stop_processes
from cluster.launch.placement import cuda_visible_devices, host_gpu_count, place_gpus
from cluster.wire import curve
from cluster.config import ClusterConfig, ConfigError
from cluster.roles import ROLE_PACKAGES, ROUTER_TOKEN_ENV, threads_per_worker

log = logging.getLogger("pdcluster.launcher")
ROUTER_START_S = 120.0
DRAIN_S = 5.0
KILL_AFTER_S = 10.0
MAX_RESTARTS = 5
MAX_BACKOFF_S = 30.0
PROGRESS_S = 5.0                # how often a launch that is still loading says so
# libgomp spins this many pauses (~20 ns each here) before a waiting worker thread sleeps: long
# enough to bridge the small ops between a decode step's matmuls, short enough that a thread
# whose partner lost its core to another process soon yields (libgomp's 300,000 stalls the
# step under load; BENCHMARKS.md, "CPU threads")
WORKER_SPIN_COUNT = 3000


class LaunchError(RuntimeError):
    pass


def concrete_control(endpoint: str) -> str:
    """tcp://HOST:0 -> tcp://HOST:<free port>; other endpoints unchanged."""
    if not endpoint.startswith("tcp://") or not endpoint.endswith(":0"):
        return endpoint
    host = endpoint[len("tcp://"):-2].strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host if host != "*" else "0.0.0.0", 0))
        port = s.getsockname()[1]
    return endpoint[:-1] + str(port)


def restart_backoff(num_restarts: int) -> float:
    """1 s, 2 s, 4 s ... MAX_BACKOFF_S: a crash loop must not spin."""
    return min(MAX_BACKOFF_S, 2.0 ** num_restarts)


def worker_env(cfg: ClusterConfig, wid: str, num_threads: Optional[int] = None) -> dict:
    n = str(num_threads or threads_per_worker(cfg, wid))
    # MALLOC_MMAP_THRESHOLD_: reuse freed heap for big KV buffers instead of a fresh mmap
    # per kv_batch (BENCHMARKS.md, "Wire codec": 1.09 -> 1.68 GB/s for split 64 MiB tensors)
    return {"PDCLUSTER_THREADS": n, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(1 << 30)),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", str(WORKER_SPIN_COUNT))}


class Launcher:
    def __init__(self, cfg: ClusterConfig, config_path: str, log_dir: str):
        self.cfg, self.config_path, self.log_dir = cfg, os.path.abspath(config_path), log_dir
        self.control = concrete_control(cfg.router.control)
        self.token = secrets.token_hex(16)
        host = cfg.router.host
        local = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else \
            "::1" if host == "::" else host
        self.http_base = f"http://{'[' + local + ']' if ':' in local else local}:{cfg.router.port}"
        self.url = f"http://{host}:{cfg.router.port}/v1"
        self.router: Optional[Child] = None
        self.workers: dict[str, Child] = {}
        self.stop_reason: Optional[str] = None
        self._curve: Optional[dict] = None
        self._http = httpx.Client(timeout=2.0, headers={"X-PDCluster-Token": self.token})

    # startup
    def start(self) -> None:
        gpus = self._place_gpus()                  # a GPU that does not exist: fail before spawning
        # NOTE: workers load their model while the router loads: it binds its control endpoint
        # first, and a worker's `register` waits in ZeroMQ until it connects
        self.spawn_router()
        for wid, _ in self.cfg.worker_ids():
            env = {**self.base_env(), **worker_env(self.cfg, wid)}
            if wid in gpus:
                env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(gpus[wid], [g for own in gpus.values() for g in own])
            argv = [sys.executable] + self.worker_args(wid, self.config_path)
            self.workers[wid] = Child(wid, argv, env, os.path.join(self.log_dir, f"{wid}.log"))
            self.workers[wid].spawn()
        self._wait_router_http()
        self._wait_registered()

    def base_env(self) -> dict:
        if self._curve is None:            # decided once: the router and all workers agree
            self._curve = self._curve_env()
        return {**os.environ, ROUTER_TOKEN_ENV: self.token, "PYTHONUNBUFFERED": "1",
                **self._curve}

    def start_router(self) -> None:
        """Spawn the router and wait until its HTTP side answers."""
        self.spawn_router()
        self._wait_router_http()

    def spawn_router(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        r = self.cfg.router
        self.router = Child("router", [sys.executable, "-m", "cluster.router", "--config",
                                       self.config_path, "--control", self.control, "--host",
                                       r.host, "--port", str(r.port), "--log-dir",
                                       self.log_dir, "--drain-timeout", str(DRAIN_S)],
                            {**self.base_env(), "OMP_NUM_THREADS": "1"},
                            os.path.join(self.log_dir, "router.log"))
        self.router.spawn()

    def worker_args(self, wid: str, config_path: str) -> list[str]:
        """A worker's command line after the interpreter (the documented `-m` form)."""
        role = self.cfg.group_of(wid).role
        return ["-m", ROLE_PACKAGES[role], "--config", config_path, "--worker-id", wid,
                "--router", self.control, "--log-dir", self.log_dir]

    def _place_gpus(self) -> dict[str, tuple[int, ...]]:
        if not any(g.gpus for g in self.cfg.groups):
            return {}
        try:
            placed = place_gpus(self.cfg, host_gpu_count())
        except ConfigError as e:
            raise LaunchError(str(e)) from None
        log.info("GPU placement: %s", ", ".join(f"{w} -> GPU {','.join(map(str, g))}" for w, g in placed.items()))
        return placed

    def _curve_env(self) -> dict:
        """Decide CURVE once for the whole cluster and hand the decision and the keys to
        every child, so the router and all workers agree."""
        sec = self.cfg.security
        if not curve.is_wanted(sec.curve, [curve.endpoint_host(self.control)]):
            return {curve.CURVE_ENV: "off"}
        keys_dir = os.path.abspath(sec.keys_dir or os.path.join(self.log_dir, "keys"))
        curve.write_keys(keys_dir)
        log.info("CURVE on; cluster keys in %s", keys_dir)
        return {curve.CURVE_ENV: "on", curve.KEYS_DIR_ENV: keys_dir}

    def _wait_router_http(self) -> None:
        deadline = time.monotonic() + ROUTER_START_S
        while time.monotonic() < deadline and self.stop_reason is None:
            if not self.router.is_running:
                raise LaunchError(f"the router exited with code {self.router.proc.returncode}"
                                  f"; tail of {self.router.log_path}:\n{self.router.tail()}")
            if self.registered() is not None:
                return
            time.sleep(0.2)
        if self.stop_reason is None:
            raise LaunchError(f"the router did not answer on {self.http_base} within "
                              f"{ROUTER_START_S:g} s; tail of {self.router.log_path}:\n"
                              f"{self.router.tail()}")

    def _wait_registered(self) -> None:
        limit = self.cfg.timeouts.register
        start = time.monotonic()
        deadline, next_report = start + limit, start + PROGRESS_S
        print(f"pdcluster: starting {len(self.workers)} worker(s); logs in {self.log_dir}",
              file=sys.stderr, flush=True)
        while self.stop_reason is None:
            for c in self.workers.values():
                if not c.is_running:
                    raise LaunchError(f"worker {c.name} exited with code {c.proc.returncode} "
                                      f"before registering; tail of {c.log_path}:\n{c.tail()}")
            if not self.router.is_running:
                raise LaunchError(f"the router exited; tail of {self.router.log_path}:\n"
                                  f"{self.router.tail()}")
            missing = sorted(set(self.workers) - set(self.registered() or []))
            if not missing:
                return
            if time.monotonic() > next_report:   # model loading can take a while: show it
                next_report += PROGRESS_S
                print(f"pdcluster: waiting for {', '.join(missing)} to load and register "
                      f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                c = self.workers[missing[0]]
                raise LaunchError(f"worker(s) {', '.join(missing)} did not register within "
                                  f"timeouts.register = {limit:g} s; tail of {c.log_path}:\n"
                                  f"{c.tail()}")
            time.sleep(0.2)

    # router's internal endpoints
    def registered(self) -> Optional[list[str]]:
        try:
            resp = self._http.get(f"{self.http_base}/internal/workers")
            resp.raise_for_status()
            return [w["worker_id"] for w in resp.json()["workers"]]
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def notify_exit(self, wid: str, reason: str) -> None:
        try:
            self._http.post(f"{self.http_base}/internal/workers/{wid}/exit",
                            json={"reason": reason})
        except httpx.HTTPError as e:
            log.warning("could not tell the router that %s exited: %s", wid, e)

    # supervision
    def supervise(self) -> int:
        """Run until a signal (0) or the router's death (1)."""
        while self.stop_reason is None:
            if not self.router.is_running:
                log.error("the router exited with code %s; stopping the cluster",
                          self.router.proc.returncode)
                print(f"pdcluster: the router exited; tail of {self.router.log_path}:\n"
                      f"{self.router.tail()}", file=sys.stderr)
                return 1
            now = time.monotonic()
            for c in self.workers.values():
                if c.restart_at is not None and now >= c.restart_at:
                    c.num_restarts += 1
                    c.spawn()
                elif c.restart_at is None and c.proc is not None and not c.is_running:
                    self._on_worker_exit(c)
                else:
                    c.renew_restart_budget(now, self.cfg.recovery.restart_reset_after)
            time.sleep(0.2)
        return 0

    def _on_worker_exit(self, c: Child) -> None:
        reason = f"process {c.proc.pid} exited with code {c.proc.returncode}"
        log.warning("worker %s: %s", c.name, reason)
        self.notify_exit(c.name, reason)
        if not self.cfg.recovery.restart_workers:
            c.proc = None
            return
        if c.num_restarts >= MAX_RESTARTS:
            log.error("worker %s: %d restarts already; not restarting it again", c.name,
                      c.num_restarts)
            c.proc = None
            return
        backoff = restart_backoff(c.num_restarts)
        c.restart_at = time.monotonic() + backoff
        log.info("worker %s: restart %d/%d in %.0f s", c.name, c.num_restarts + 1,
                 MAX_RESTARTS, backoff)

    # shutdown
    def shutdown(self) -> None:
        if self.router is not None and self.router.is_running:
            log.info("stopping the router (drain up to %.0f s)", DRAIN_S)
            stop_processes([self.router.proc], DRAIN_S + KILL_AFTER_S)
        procs = [c.proc for c in self.workers.values() if c.is_running]
        log.info("stopping %d worker(s)", len(procs))
        stop_processes(procs, KILL_AFTER_S)
        self._http.close()


def run(cfg: ClusterConfig, config_path: str, log_dir: str, make_launcher=None) -> int:
    """Launch, supervise until SIGTERM/SIGINT, stop everything. Returns the exit code.

    `make_launcher(cfg, config_path, log_dir)` builds another backend's launcher (Ray)."""
    os.makedirs(log_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(log_dir, "launcher.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s launcher %(levelname)s: %(message)s"))
    logging.getLogger("pdcluster").addHandler(handler)
    logging.getLogger("pdcluster").setLevel(logging.INFO)
    launcher = (make_launcher or Launcher)(cfg, config_path, log_dir)

    def on_signal(sig, frame):
        launcher.stop_reason = signal.Signals(sig).name
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        launcher.start()
        if launcher.stop_reason is None:
            roles = ", ".join(wid for wid, _ in cfg.worker_ids())
            print(f"pdcluster: serving {cfg.model.name} at {launcher.url} ({roles}); "
                  f"logs in {log_dir}", flush=True)
            log.info("ready: %s", launcher.url)
            code = launcher.supervise()
    except (LaunchError, curve.CurveError) as e:
        log.error("%s", e)
        print(f"pdcluster: launch failed: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        log.info("shutting down (%s)", launcher.stop_reason or "error")
        launcher.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
    return code
