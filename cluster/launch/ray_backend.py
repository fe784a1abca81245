"""`pdcluster launch CONFIG --backend ray [--address ADDR]`: the same cluster on Ray.

The router runs on the driver (the `pdcluster launch` process), exactly as the local
launcher starts it. Each worker is a Ray actor, `WorkerProcess`, that runs the documented
command line (`python -m prefill_worker --config ... --worker-id prefill-0 --router ...`)
as its own child process: the worker keeps its signals, threads and logs as it has them
everywhere else, and Ray supplies what it is good at: placement, GPUs
(`CUDA_VISIBLE_DEVICES` of the actor reaches the child), and restarts. The actor exits when
its worker does, so Ray restarts it (`max_restarts`) and the new worker registers under
the same id; the router meanwhile declares the old one dead after
`timeouts.heartbeat_dead_after`. The child dies with its actor (PR_SET_PDEATHSIG).

Placement: one bundle per worker in a placement group (`--placement`, default SPREAD:
prefill and decode on different nodes when Ray has them); a bundle holds
`scheduler.threads` CPUs (0 = the Ray cluster's CPUs / workers) and one GPU when
`model.device` is CUDA. Without `--address` a local Ray starts (no dashboard) and stops
with the launcher; with it the launcher joins that cluster and leaves it running. On
several nodes set `router.control` to an address the nodes reach, and install pdcluster
(and the weights) on every node: the actor sends the config's text, not its path.
With CURVE on (`[security]`), the launcher's key pair travels to each actor, which writes
it 0600 on its node. Ray moves the actor's constructor arguments with its own
serialization; the cluster's messages still travel only as msgpack over ZeroMQ.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

from cluster.config import ClusterConfig
from cluster.launch.child_process import Child, stop_processes
from cluster.wire import curve
from cluster.launch.launcher import (KILL_AFTER_S, MAX_RESTARTS, LaunchError, Launcher,
                                     worker_env)

log = logging.getLogger("pdcluster.launcher")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CONFIG_ARG = "{config}"                # replaced by the path the actor wrote the config to
ACTOR_PREFIX = "pdcluster:"            # actor names: pdcluster:prefill-0


class WorkerProcess:
    """Ray actor body: one worker as a child process; the actor exits when the worker does."""

    def __init__(self, worker_id: str, args: list[str], config_text: str, log_dir: str,
                 env: dict, key_files: dict[str, str]):
        os.makedirs(log_dir, exist_ok=True)
        config_path = os.path.join(log_dir, f"ray-{worker_id}.toml")   # this node's copy
        with open(config_path, "w") as f:
            f.write(config_text)
        if key_files:                  # CURVE on: this node's copy of the cluster keys
            keys_dir = os.path.join(log_dir, f"ray-{worker_id}-keys")
            # a restarted actor rewrites its copy
            curve.save_keys(keys_dir, curve.CurveKeys.from_files(key_files), overwrite=True)
            env = {**env, curve.KEYS_DIR_ENV: keys_dir}
        argv = [sys.executable] + [config_path if a == CONFIG_ARG else a for a in args]
        self.child = Child(worker_id, argv, {**os.environ, **env},
                           os.path.join(log_dir, f"{worker_id}.log"))
        self.is_stopping = False
        spawned = threading.Event()
        threading.Thread(target=self._run_worker, args=(spawned,), daemon=True).start()
        if not spawned.wait(60) or self.child.proc is None:
            raise RuntimeError(f"could not start worker {worker_id}: {argv}")

    def _run_worker(self, spawned: threading.Event) -> None:
        # NOTE: PR_SET_PDEATHSIG fires when the spawning *thread* ends, and Ray retires its
        # task threads; this thread lives as long as the worker, so spawn from here
        try:
            self.child.spawn()
        finally:
            spawned.set()
        code = self.child.proc.wait()
        if not self.is_stopping:       # a death, not a shutdown: let Ray restart the actor
            log.warning("worker %s exited with code %s", self.child.name, code)
            os._exit(1)

    def pid(self) -> int:
        return self.child.proc.pid

    def expect_exit(self) -> None:
        """The cluster is shutting down: the router's drain will stop the worker."""
        self.is_stopping = True

    def stop(self) -> int:
        self.is_stopping = True
        stop_processes([self.child.proc], KILL_AFTER_S)
        return self.child.proc.returncode


def bundle(cfg: ClusterConfig, wid: str, total_cpus: float) -> dict:
    group = cfg.group_of(wid)
    cpus = group.scheduler.threads or total_cpus / max(1, len(cfg.worker_ids()))
    out = {"CPU": math.floor(cpus * 1000) / 1000}     # 3 x 2/3 must fit in 2 CPUs
    if cfg.model.device.startswith("cuda"):
        out["GPU"] = group.tp          # one per rank, as `gpus` deals them; Ray picks which
    return out


class RayLauncher(Launcher):
    """Launcher whose workers are Ray actors; router, supervision and drain are the base's."""

    def __init__(self, cfg: ClusterConfig, config_path: str, log_dir: str,
                 address: Optional[str] = None, placement: str = "SPREAD"):
        super().__init__(cfg, config_path, log_dir)
        self.address, self.placement = address, placement
        self.actors: dict[str, object] = {}
        self.group = None
        self.startup_s: dict[str, float] = {}

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        t0 = time.monotonic()
        # a Ray of our own lives on loopback, like the local launcher's processes, without
        # Ray's memory monitor: it would kill the actor, not the worker process that holds
        # the memory (a worker sizes its KV pool up front anyway)
        local = {} if self.address else {"_node_ip_address": "127.0.0.1",
                                         "_system_config": {"memory_monitor_refresh_ms": 0}}
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                 namespace="pdcluster", configure_logging=False, **local)
        for sig, handler in handlers.items():  # NOTE: ray.init takes SIGTERM; the drain needs it
            signal.signal(sig, handler)
        self.startup_s["ray_init"] = time.monotonic() - t0
        self.start_router()
        total_cpus = ray.cluster_resources().get("CPU", 1.0)
        ids = [wid for wid, _ in self.cfg.worker_ids()]
        bundles = [bundle(self.cfg, wid, total_cpus) for wid in ids]
        t1 = time.monotonic()
        self.group = placement_group(bundles, strategy=self.placement, name="pdcluster")
        try:
            ray.get(self.group.ready(), timeout=self.cfg.timeouts.register)
        except ray.exceptions.GetTimeoutError:
            raise LaunchError(f"Ray could not place {bundles} ({self.placement}) within "
                              f"timeouts.register; the cluster has {ray.cluster_resources()}")
        self.startup_s["placement_group"] = time.monotonic() - t1
        with open(self.config_path) as f:
            config_text = f.read()
        decided = {k: v for k, v in self.base_env().items()
                   if k in (curve.CURVE_ENV, curve.KEYS_DIR_ENV)}
        key_files = {}
        if decided.get(curve.CURVE_ENV) == "on":
            key_files = curve.read_keys(decided[curve.KEYS_DIR_ENV]).files()
        actor_cls = ray.remote(WorkerProcess)
        for i, wid in enumerate(ids):
            num_threads = max(1, int(bundles[i]["CPU"]))
            env = {"PYTHONUNBUFFERED": "1", curve.CURVE_ENV: decided.get(curve.CURVE_ENV, "off"),
                   **worker_env(self.cfg, wid, num_threads)}
            self.actors[wid] = actor_cls.options(
                name=ACTOR_PREFIX + wid, max_restarts=MAX_RESTARTS, max_task_retries=0,
                num_cpus=bundles[i]["CPU"], num_gpus=bundles[i].get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i),
            ).remote(wid, self.worker_args(wid, CONFIG_ARG), config_text, self.log_dir, env,
                     key_files)
        self._wait_actors_registered()
        self.startup_s["total"] = time.monotonic() - t0
        log.info("ray startup: %s", ", ".join(f"{k} {v:.2f} s" for k, v in self.startup_s.items()))

    def _wait_actors_registered(self) -> None:
        import ray
        deadline = time.monotonic() + self.cfg.timeouts.register
        while self.stop_reason is None:
            missing = sorted(set(self.actors) - set(self.registered() or []))
            if not missing:
                return
            if not self.router.is_running:
                raise LaunchError(f"the router exited; tail of {self.router.log_path}:\n"
                                  f"{self.router.tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"worker actor(s) {', '.join(missing)} did not register "
                                  f"within timeouts.register = {self.cfg.timeouts.register:g} s;"
                                  f" logs in {self.log_dir} on their nodes")
            try:                       # surfaces an actor that could not even start
                ray.get([self.actors[w].pid.remote() for w in missing], timeout=0.2)
            except ray.exceptions.GetTimeoutError:
                pass
            except ray.exceptions.RayActorError as e:
                raise LaunchError(f"a worker actor died before registering: {e}") from None
            time.sleep(0.2)

    def shutdown(self) -> None:
        try:
            import ray
        except ImportError:
            return super().shutdown()
        if not ray.is_initialized():
            return super().shutdown()
        try:                           # workers the drain stops must not be restarted by Ray
            ray.get([a.expect_exit.remote() for a in self.actors.values()], timeout=10)
        except Exception as e:
            log.warning("telling worker actors about the shutdown: %s", e)
        super().shutdown()             # router first: it drains in-flight requests
        try:
            ray.get([a.stop.remote() for a in self.actors.values()], timeout=KILL_AFTER_S + 5)
        except Exception as e:         # a dead actor: its child died with it
            log.warning("stopping worker actors: %s", e)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.group)
        ray.shutdown()                 # stops the local Ray this launcher started


def run(cfg: ClusterConfig, config_path: str, log_dir: str, address: Optional[str] = None,
        placement: str = "SPREAD") -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("pdcluster: the Ray backend needs Ray: pip install 'pdcluster[ray]'",
              file=sys.stderr)
        return 2
    from cluster.launch import launcher
    return launcher.run(cfg, config_path, log_dir, make_launcher=lambda c, p, d: RayLauncher(
        c, p, d, address=address, placement=placement))
