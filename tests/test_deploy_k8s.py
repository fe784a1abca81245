"""`pdcluster deploy k8s`: the rendered manifests are valid Kubernetes objects, their
command lines are the documented ones (parsed by the real argparse, `--help` runs), and the
committed deploy/kubernetes/ is the render of configs/2p2d.toml."""
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from cluster.config import load_config
from cluster.roles import ROLE_PACKAGES
from cluster.launch import k8s
from cluster.launch.cli import main as cli_main
from cluster.router.__main__ import parse_args as router_parse_args
from cluster.runtime import health_file
from cluster.runtime.worker_main import parse_args as worker_parse_args
from cluster.wire import curve

kv = pytest.importorskip("kubernetes_validate", reason="install the deploy extra: pip install -e '.[deploy]'")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["configs/2p2d.toml", "configs/local.toml", "configs/unified.toml"]
K8S_VERSION = kv.latest_version()

# The prometheus-operator CRD's schema is not among the Kubernetes schemas: the part of
# monitoring.coreos.com/v1 ServiceMonitor that we render, transcribed from its CRD.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                 "properties": {
                     "selector": {"type": "object", "properties": {
                         "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                     "endpoints": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"}, "path": {"type": "string"},
                             "interval": {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h))+)$"}}}}}},
    },
}


def rendered(config: str) -> list[dict]:
    path = os.path.join(ROOT, config)
    with open(path) as f:
        return k8s.render(load_config(path), f.read(), key_files={"cluster.key": "x"})


def containers(manifests: list[dict]):
    for m in manifests:
        if m["kind"] in ("Deployment", "StatefulSet"):
            for c in m["spec"]["template"]["spec"]["containers"]:
                yield m, c


def expand(args: list[str], env: dict) -> list[str]:
    """The kubelet's $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda g: env[g.group(1)], a) for a in args]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(config):
    import jsonschema
    manifests = rendered(config)
    kinds = sorted(m["kind"] for m in manifests)
    assert {"ConfigMap", "Secret", "Deployment", "Service", "StatefulSet", "ServiceMonitor"} <= set(kinds)
    for m in manifests:
        # through YAML as kubectl would read it
        doc = yaml.safe_load(k8s.to_yaml([m]).removeprefix("---\n"))
        if m["kind"] == "ServiceMonitor":
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, K8S_VERSION, strict=True)
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        else:
            kv.validate(doc, K8S_VERSION, strict=True)


def test_render_of_2p2d_has_two_prefill_and_two_decode_replicas():
    sets = {m["metadata"]["name"]: m for m in rendered("configs/2p2d.toml") if m["kind"] == "StatefulSet"}
    assert sorted(sets) == ["decode", "prefill"]
    assert sets["prefill"]["spec"]["replicas"] == 2 and sets["decode"]["spec"]["replicas"] == 2


@pytest.mark.parametrize("config", CONFIGS)
def test_pod_names_are_the_config_worker_ids_and_their_command_lines_parse(config):
    cfg = load_config(os.path.join(ROOT, config))
    seen = set()
    for m, c in containers(rendered(config)):
        assert c["command"] == ["python"] and c["args"][0] == "-m"
        if m["kind"] == "Deployment":
            args = router_parse_args(c["args"][2:])
            assert (args.config, args.host, args.port) == (k8s.CONFIG_FILE, "0.0.0.0", cfg.router.port)
            assert args.control == f"tcp://0.0.0.0:{k8s.CONTROL_PORT}"
            continue
        role = m["metadata"]["name"]
        assert c["args"][1] == ROLE_PACKAGES[role]
        env_names = {e["name"] for e in c["env"]}
        for i in range(m["spec"]["replicas"]):     # a StatefulSet's pods are <name>-<ordinal>
            args = worker_parse_args(role, expand(c["args"][2:], {"POD_NAME": f"{role}-{i}",
                                                                 "POD_IP": "10.0.0.7"}))
            assert {"POD_NAME", "POD_IP"} <= env_names
            assert args.router == k8s.router_endpoint() == f"tcp://{k8s.ROUTER}:{k8s.CONTROL_PORT}"
            assert args.config == k8s.CONFIG_FILE and args.health_file == k8s.HEALTH_FILE
            assert args.data_host == ("10.0.0.7" if role in k8s.DATA_PLANE_ROLES else "127.0.0.1")
            assert cfg.group_of(args.worker_id).role == role
            seen.add(args.worker_id)
    assert seen == {wid for wid, _ in cfg.worker_ids()}


@pytest.mark.slow                                  # one interpreter per module, all at once
def test_every_module_in_the_manifests_runs_with_help():
    modules = set()
    for config in CONFIGS:
        for _, c in containers(rendered(config)):
            modules.add(c["args"][1])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in c.get(probe, {}):
                    modules.add(c[probe]["exec"]["command"][2])
    assert {"cluster.router", "prefill_worker", "decode_worker", "cluster.runtime.health_file"} <= modules
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = {module: subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module in sorted(modules)}
    for module, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, f"{module} --help: {stderr}"
        assert "usage:" in stdout


def test_router_service_exposes_http_and_control_and_the_monitor_scrapes_metrics():
    by_kind = {(m["kind"], m["metadata"]["name"]): m for m in rendered("configs/2p2d.toml")}
    svc = by_kind[("Service", k8s.ROUTER)]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"http": 8000, "control": k8s.CONTROL_PORT}
    monitor = by_kind[("ServiceMonitor", k8s.ROUTER)]
    assert monitor["spec"]["selector"]["matchLabels"] == svc["metadata"]["labels"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    config = by_kind[("ConfigMap", k8s.CONFIG_MAP)]
    with open(os.path.join(ROOT, "configs/2p2d.toml")) as f:
        assert config["data"]["cluster.toml"] == f.read()


def test_gpu_configs_request_one_gpu_per_worker(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text('[model]\ndevice = "cuda"\ndtype = "bfloat16"\n[[prefill]]\ncount = 1\n[[decode]]\ncount = 3\n')
    manifests = k8s.render(load_config(path), path.read_text(), key_files={})
    for m, c in containers(manifests):
        if m["kind"] == "StatefulSet":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    cpu_only = rendered("configs/2p2d.toml")
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for _, c in containers(cpu_only))


def test_a_tensor_parallel_worker_is_one_pod_with_a_gpu_per_rank(tmp_path):
    path = tmp_path / "tp.toml"
    path.write_text('[model]\ndevice = "cuda"\ndtype = "bfloat16"\n[[unified]]\ncount = 2\ntp = 4\n')
    sets = [(m, c) for m, c in containers(k8s.render(load_config(path), path.read_text(), key_files={}))
            if m["kind"] == "StatefulSet"]
    assert [(m["spec"]["replicas"], c["resources"]["limits"]["nvidia.com/gpu"]) for m, c in sets] == [(2, "4")]


def test_committed_manifests_are_the_render_of_2p2d(tmp_path):
    assert cli_main(["deploy", "k8s", os.path.join(ROOT, "configs/2p2d.toml"), "--out", str(tmp_path),
                     "--no-secret"]) == 0
    committed = os.path.join(ROOT, "deploy", "kubernetes")
    want = sorted(f for f in os.listdir(tmp_path))
    assert sorted(f for f in os.listdir(committed) if f.endswith(".yaml")) == want
    for name in want:
        with open(os.path.join(committed, name)) as a, open(tmp_path / name) as b:
            assert a.read() == b.read(), f"deploy/kubernetes/{name} is stale: re-render it"


def test_deploy_writes_a_private_secret_with_fresh_curve_keys(tmp_path):
    for out in ("a", "b"):
        assert cli_main(["deploy", "k8s", os.path.join(ROOT, "configs/2p2d.toml"), "--out", str(tmp_path / out)]) == 0
    secrets = []
    for out in ("a", "b"):
        path = tmp_path / out / f"secret-{k8s.CURVE_SECRET}.yaml"
        assert os.stat(path).st_mode & 0o077 == 0
        secrets.append(yaml.safe_load(path.read_text().removeprefix("---\n"))["stringData"])
    assert secrets[0] != secrets[1] and all(len(v.strip()) == 40 for v in secrets[0].values())
    for s in secrets:                              # what a worker reads from the mounted Secret
        keys_dir = tmp_path / f"keys-{len(s)}-{id(s)}"
        keys_dir.mkdir(mode=0o700)
        for name, text in s.items():
            (keys_dir / name).write_text(text)
            os.chmod(keys_dir / name, 0o400)
        assert curve.read_keys(str(keys_dir)).public == s[curve.PUBLIC_FILE].strip().encode()


def test_every_pod_runs_with_curve_on_and_the_mounted_keys():
    for _, c in containers(rendered("configs/2p2d.toml")):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env[curve.CURVE_ENV] == "on" and env[curve.KEYS_DIR_ENV] == k8s.KEYS_DIR
        assert {m["mountPath"] for m in c["volumeMounts"]} >= {k8s.KEYS_DIR, k8s.CONFIG_FILE}


def test_health_file_probe_passes_while_fresh_and_fails_when_stale_or_missing(tmp_path):
    path = str(tmp_path / "health")
    assert health_file.main([path, "--max-age", "5"]) == 1
    health_file.touch(path)
    assert health_file.main([path, "--max-age", "5"]) == 0
    old = time.time() - 60
    os.utime(path, (old, old))
    assert health_file.main([path, "--max-age", "5"]) == 1
