"""`pdcluster deploy k8s CONFIG`: Kubernetes manifests rendered from the cluster's TOML.

What runs where (deploy it into a namespace of its own: the worker sets are named after
their roles):
- ConfigMap `pdcluster-config`: the TOML itself, mounted at /etc/pdcluster/cluster.toml,
  so every pod reads the file the launcher would have read;
- Secret `pdcluster-curve`: the cluster's CURVE key files (fresh ones per render), mounted
  at /etc/pdcluster/keys;
- Deployment + Service `pdcluster-router`: one router (it holds the request state, so
  never more), HTTP on `router.port`, the control endpoint on CONTROL_PORT; readiness is
  GET /health (a worker of each needed role registered), liveness a TCP connect (a router
  without workers is alive, only not ready);
- one StatefulSet per role (`prefill`, `decode`, ...) with the config's worker count as
  replicas: a StatefulSet's pods are named `prefill-0`, `prefill-1` ..., which are exactly
  the config's worker ids, so `--worker-id $(POD_NAME)` needs no shell. Workers find the
  router through the Service's DNS name and bind (and advertise) their KV data plane on the
  pod IP from the downward API (`--data-host $(POD_IP)`). CURVE is on in every pod
  (PDCLUSTER_CURVE=on, PDCLUSTER_KEYS_DIR at the mounted Secret). Probes read the worker's `--health-file`
  (`cluster/runtime/health_file.py`): workers have no HTTP port;
- ServiceMonitor `pdcluster-router` (Prometheus operator): scrapes the router's /metrics,
  which carries every worker's gauges.
"""
from __future__ import annotations

import math
import os
from typing import Optional

from cluster.config import ClusterConfig
from cluster.roles import DATA_PLANE_ROLES, ROLE_PACKAGES
from cluster.wire import curve

ROUTER = "pdcluster-router"
CONFIG_MAP = "pdcluster-config"
CURVE_SECRET = "pdcluster-curve"
CONTROL_PORT = 5557
CONFIG_DIR = "/etc/pdcluster"
CONFIG_FILE = f"{CONFIG_DIR}/cluster.toml"
KEYS_DIR = f"{CONFIG_DIR}/keys"
HEALTH_FILE = "/tmp/pdcluster-health"
DEFAULT_IMAGE = "pdcluster:0.1.0"
DEFAULT_CPUS, DEFAULT_MEMORY = 2, "4Gi"         # per worker pod: requests = limits
PROBE_PERIOD_S = 5


def labels(component: str) -> dict:
    return {"app.kubernetes.io/name": "pdcluster", "app.kubernetes.io/component": component}


def router_endpoint() -> str:
    """The control endpoint workers connect to: the router Service's DNS name."""
    return f"tcp://{ROUTER}:{CONTROL_PORT}"


def router_args(cfg: ClusterConfig) -> list[str]:
    return ["-m", "cluster.router", "--config", CONFIG_FILE, "--control",
            f"tcp://0.0.0.0:{CONTROL_PORT}", "--host", "0.0.0.0", "--port", str(cfg.router.port)]


def worker_args(role: str) -> list[str]:
    """`$(POD_NAME)` / `$(POD_IP)` are expanded by the kubelet from the container's env."""
    args = ["-m", ROLE_PACKAGES[role], "--config", CONFIG_FILE, "--worker-id", "$(POD_NAME)",
            "--router", router_endpoint(), "--health-file", HEALTH_FILE]
    if role in DATA_PLANE_ROLES:
        args += ["--data-host", "$(POD_IP)"]
    return args


def curve_env() -> list[dict]:
    """Every pod: CURVE on (the planes leave the pod), keys from the mounted Secret."""
    return [{"name": curve.CURVE_ENV, "value": "on"}, {"name": curve.KEYS_DIR_ENV, "value": KEYS_DIR}]


def _volumes() -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "config", "configMap": {"name": CONFIG_MAP}},
               {"name": "curve-keys", "secret": {"secretName": CURVE_SECRET, "defaultMode": 0o400}}]
    mounts = [{"name": "config", "mountPath": CONFIG_FILE, "subPath": "cluster.toml",
               "readOnly": True},
              {"name": "curve-keys", "mountPath": KEYS_DIR, "readOnly": True}]
    return volumes, mounts


def _resources(cfg: ClusterConfig, cpus: int, memory: str, tp: int = 1) -> dict:
    amounts = {"cpu": str(cpus), "memory": memory}
    if cfg.model.device.startswith("cuda"):
        # one GPU per rank (a worker's ranks share its pod), as `gpus` deals them on one host;
        # which ones is the scheduler's
        amounts["nvidia.com/gpu"] = str(tp)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _health_probe(max_age_s: float, **timing) -> dict:
    return {"exec": {"command": ["python", "-m", "cluster.runtime.health_file", HEALTH_FILE,
                                 "--max-age", f"{max_age_s:g}"]},
            "periodSeconds": PROBE_PERIOD_S, **timing}


def worker_set(cfg: ClusterConfig, role: str, image: str, cpus: int, memory: str) -> list[dict]:
    groups = [g for g in cfg.groups if g.role == role]
    replicas = sum(g.count for g in groups)
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           # torch threads = the pod's CPU limit, not the node's core count
           {"name": "PDCLUSTER_THREADS", "valueFrom": {"resourceFieldRef": {
               "resource": "limits.cpu", "divisor": "1"}}},
           {"name": "PYTHONUNBUFFERED", "value": "1"}, *curve_env()]
    volumes, mounts = _volumes()
    t = cfg.timeouts
    container = {
        "name": "worker", "image": image, "command": ["python"], "args": worker_args(role),
        "env": env, "resources": _resources(cfg, cpus, memory, max(g.tp for g in groups)), "volumeMounts": mounts,
        # loading the model may take up to timeouts.register; liveness waits for it
        "startupProbe": _health_probe(3 * t.heartbeat_interval, failureThreshold=max(
            1, math.ceil(t.register / PROBE_PERIOD_S))),
        "readinessProbe": _health_probe(3 * t.heartbeat_interval),
        "livenessProbe": _health_probe(max(30.0, 10 * t.heartbeat_interval), failureThreshold=3),
    }
    selector = labels(role)
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": role, "labels": selector},
         "spec": {"clusterIP": "None", "selector": selector}},        # the set's pod DNS names
        {"apiVersion": "apps/v1", "kind": "StatefulSet",
         "metadata": {"name": role, "labels": selector},
         "spec": {"serviceName": role, "replicas": replicas,
                  "podManagementPolicy": "Parallel",                  # workers start independently
                  "selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": selector},
                               "spec": {"containers": [container], "volumes": volumes,
                                        "terminationGracePeriodSeconds": 30}}}},
    ]


def router_objects(cfg: ClusterConfig, image: str) -> list[dict]:
    selector = labels("router")
    volumes, mounts = _volumes()
    port = cfg.router.port
    container = {
        "name": "router", "image": image, "command": ["python"], "args": router_args(cfg),
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, *curve_env(),
                # the pod's CPU limit, not the node's cores, sizes `[router] api_servers = 0`
                {"name": "PDCLUSTER_THREADS", "valueFrom": {"resourceFieldRef": {
                    "resource": "limits.cpu", "divisor": "1"}}}],
        "ports": [{"name": "http", "containerPort": port},
                  {"name": "control", "containerPort": CONTROL_PORT}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                      "limits": {"cpu": "2", "memory": "2Gi"}},
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": PROBE_PERIOD_S},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "initialDelaySeconds": 30,
                          "periodSeconds": 10, "failureThreshold": 3},
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": ROUTER, "labels": selector},
         "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                  "selector": {"matchLabels": selector},
                  "template": {"metadata": {"labels": selector},
                               "spec": {"containers": [container], "volumes": volumes}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": ROUTER, "labels": selector},
         "spec": {"selector": selector,
                  "ports": [{"name": "http", "port": port, "targetPort": "http"},
                            {"name": "control", "port": CONTROL_PORT, "targetPort": "control"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": ROUTER, "labels": selector},
         "spec": {"selector": {"matchLabels": selector},
                  "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]}},
    ]


def curve_key_files() -> dict[str, str]:
    """One fresh CURVE key pair for the cluster, as the files `cluster/wire/curve.py` reads."""
    return curve.CurveKeys.generate().files()


def render(cfg: ClusterConfig, config_text: str, image: str = DEFAULT_IMAGE, cpus: int = DEFAULT_CPUS,
           memory: str = DEFAULT_MEMORY, key_files: Optional[dict[str, str]] = None) -> list[dict]:
    """Every manifest of the cluster, in apply order."""
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": CONFIG_MAP, "labels": labels("config")},
                  "data": {"cluster.toml": config_text}}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": {"name": CURVE_SECRET, "labels": labels("curve-keys")},
              "stringData": key_files if key_files is not None else curve_key_files()}
    out = [config_map, secret] + router_objects(cfg, image)
    for role in ROLE_PACKAGES:
        if sum(g.count for g in cfg.groups if g.role == role) > 0:
            out += worker_set(cfg, role, image, cpus, memory)
    return out


def file_name(manifest: dict) -> str:
    return f"{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"


def to_yaml(manifests: list[dict]) -> str:
    import yaml

    class Plain(yaml.SafeDumper):      # the label dicts are shared: no &id001 anchors
        def ignore_aliases(self, data):
            return True
    return "".join("---\n" + yaml.dump(m, Dumper=Plain, sort_keys=False) for m in manifests)


def write(manifests: list[dict], out_dir: str) -> list[str]:
    """One file per object (`kubectl apply -f DIR`); returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for m in manifests:
        path = os.path.join(out_dir, file_name(m))
        with open(path, "w") as f:
            f.write(to_yaml([m]))
        if m["kind"] == "Secret":
            os.chmod(path, 0o600)
        paths.append(path)
    return paths
