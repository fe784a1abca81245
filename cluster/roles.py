"""The worker roles and the facts every process agrees on about them, in one place.

Role names and the package each runs as, the model name a worker serves, the launcher's
token variable, the per-worker thread formula, the router's front-end count and the
`PDCLUSTER_LOG_FORWARD_ITERS` rule.
Config, wire checks, router, launcher and workers import them from here.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

ROLE_PACKAGES = {"prefill": "prefill_worker", "decode": "decode_worker",
                 "unified": "cluster.unified", "dllm": "dllm"}
ROLES = tuple(ROLE_PACKAGES)
DATA_PLANE_ROLES = ("prefill", "decode", "dllm")    # the roles that may hand KV off (--data-host; a
                                                    # dllm worker when its group prefills remotely)
SWITCHABLE_ROLES = ("prefill", "decode", "unified")  # a worker may switch among these in place

ROUTER_TOKEN_ENV = "PDCLUSTER_ROUTER_TOKEN"         # the launcher's secret for /internal/*
THREADS_ENV = "PDCLUSTER_THREADS"                    # e.g. a pod's CPU limit (deploy k8s)
LOG_FORWARD_ITERS_ENV = "PDCLUSTER_LOG_FORWARD_ITERS"


def served_model(config, group) -> str:
    """The model name a worker of `group` registers under: a DLLM group's own name, else [model]'s."""
    if group.role == "dllm":
        return group.model or f"{config.model.name}-dllm"
    return config.model.name


def threads_per_worker(config, worker_id: str, env: Optional[Mapping[str, str]] = None) -> int:
    """Torch threads of one worker process (each tensor-parallel rank is one): its group's
    `threads`, else `PDCLUSTER_THREADS`, else the cores shared evenly by every rank of every
    worker of the config (several processes on one host must not oversubscribe it)."""
    n = config.group_of(worker_id).scheduler.threads
    if n <= 0:
        raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
        n = int(raw) if raw.isdigit() else 0
    num_ranks = sum(group.tp for _, group in config.worker_ids())
    return n if n > 0 else max(1, (os.cpu_count() or 1) // max(1, num_ranks))


CORES_PER_API_SERVER = 4
MAX_API_SERVERS = 8


def api_servers(config, cores: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> int:
    """The router's HTTP front-end processes: `[router] api_servers`, or with 0 one per
    CORES_PER_API_SERVER cores this process may use (`PDCLUSTER_THREADS` when set, as a pod's CPU
    limit, else its CPU affinity), 1 to MAX_API_SERVERS. Below 8 cores that is 1: one process
    serves HTTP and dispatch with no extra hop, leaving the cores to the workers."""
    if config.router.api_servers > 0:
        return config.router.api_servers
    if cores is None:
        raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
        cores = int(raw) if raw.isdigit() and int(raw) > 0 else len(os.sched_getaffinity(0))
    return max(1, min(MAX_API_SERVERS, cores // CORES_PER_API_SERVER))


def log_forward_iters_override(env: Optional[Mapping[str, str]] = None) -> Optional[bool]:
    """`PDCLUSTER_LOG_FORWARD_ITERS`: unset or empty -> None (keep the config), "0"/"1" -> off/on;
    anything else is a ValueError (the config loader reports it as a ConfigError)."""
    raw = (os.environ if env is None else env).get(LOG_FORWARD_ITERS_ENV, "").strip()
    if raw == "":
        return None
    if raw not in ("0", "1"):
        raise ValueError(f"${LOG_FORWARD_ITERS_ENV}: expected 0 or 1, got {raw!r}")
    return raw == "1"
