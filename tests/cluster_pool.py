"""Launched clusters shared by several test modules: a launch costs seconds of the suite's
budget, and modules that only send requests need no cluster of their own.

A module that neither kills, stops nor reconfigures the cluster's processes declares the
shared cluster it uses and takes it from conftest's `shared_cluster` fixture:

    pytestmark = [pytest.mark.integration, pytest.mark.shared_cluster("local")]

    @pytest.fixture(scope="module")
    def cluster(shared_cluster):
        return shared_cluster

conftest runs the modules of one key one after another (where the first of them ran), launches
the cluster on first use and stops it after the last of them, asserting that SIGTERM left no
process behind. A module that kills or stops workers keeps a cluster of its own.
"""
from __future__ import annotations

from typing import Callable, Optional

from tests.cluster_harness import REFERENCE_WEIGHTS, LaunchedCluster, cluster_config, repo_config

SHARED_CLUSTERS: dict[str, Callable[[], LaunchedCluster]] = {
    # what `make run` starts: 1 prefill + 1 decode + 1 dllm worker, float32 reference weights
    "local": lambda: LaunchedCluster(repo_config("local", REFERENCE_WEIGHTS), "local"),
    # `pdcluster serve`: no config file, 1 prefill + 1 decode, default (native) weights, HTTP on
    # every interface
    "serve": lambda: LaunchedCluster("", "serve", serve=True, args=("--host", "0.0.0.0")),
    # one unified worker (prefill and decode in one process)
    "unified": lambda: LaunchedCluster(cluster_config("[[unified]]\ncount = 1\n"), "unified"),
}


class ClusterPool:
    def __init__(self):
        self.clusters: dict[str, LaunchedCluster] = {}

    def get(self, key: str) -> LaunchedCluster:
        """The cluster of `key`, launched now if none is running."""
        c = self.clusters.get(key)
        if c is None or c.proc.poll() is not None:
            c = self.clusters[key] = SHARED_CLUSTERS[key]()
        return c

    def release(self, key: str) -> list:
        """Stop the cluster of `key` (SIGTERM); the processes it left running (then killed)."""
        c = self.clusters.pop(key, None)
        return [] if c is None else c.stop()

    def close(self) -> None:
        for key in list(self.clusters):
            self.release(key)


def shared_cluster_key(item) -> Optional[str]:
    marker = item.get_closest_marker("shared_cluster")
    return marker.args[0] if marker else None


def group_by_shared_cluster(items: list) -> list:
    """`items` with the modules of one shared cluster moved next to the first of them; every
    module's items stay together and in order, other modules keep their places."""
    by_module: dict[object, list] = {}
    for item in items:
        by_module.setdefault(item.module, []).append(item)
    keys = {module: shared_cluster_key(its[0]) for module, its in by_module.items()}
    ordered, placed = [], set()
    for module in by_module:
        if module in placed:
            continue
        group = [module] if keys[module] is None else [m for m in by_module if keys[m] == keys[module]]
        for m in group:
            ordered += by_module[m]
            placed.add(m)
    return ordered


def is_last_user(items: list, module, key: str) -> bool:
    """Whether `module` is the last module of the session's `items` that uses cluster `key`."""
    users = [item.module for item in items if shared_cluster_key(item) == key]
    return not users or users[-1] is module
