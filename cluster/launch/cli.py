"""`pdcluster` console script: launch | serve | worker | router | deploy | keys | bench | profile | plan.

    pdcluster launch CONFIG [--port N] [--host H] [--log-dir DIR] [--backend local|ray [--address A]]
    pdcluster serve [MODEL_PATH] [--port N] [--host H] [--log-dir DIR]   # 1 prefill + 1 decode
    pdcluster worker --role R --config C --worker-id ID --router ENDPOINT [--log-dir DIR]
    pdcluster router --config C --control ENDPOINT [--port N]            # the router alone
    pdcluster deploy k8s CONFIG [--out DIR] [--image IMG] [--no-secret]  # Kubernetes manifests
    pdcluster keys DIR [--force]                                          # the cluster's CURVE key pair
    pdcluster bench --url URL [--num-requests N --prompt-len P --max-tokens M --concurrency C]
    pdcluster profile CONFIG --out PROFILE.json                           # measured cost model
    pdcluster plan --profile PROFILE.json --gpus N --slo-ttft S --slo-tpot S [--workload FILE]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from dataclasses import replace

from cluster.bench import cli as bench
from cluster.config import ConfigError, ModelConfigSection, RouterConfig, load_config
from cluster.launch import k8s
from cluster.plan import cli as plan, profile
from cluster.roles import ROLE_PACKAGES


def _log_dir(arg) -> str:
    return arg or tempfile.mkdtemp(prefix="pdcluster-logs-")


def _config(path, check_model: bool = False):
    """The loaded config, or None after printing why not (the command exits 2). `check_model`: also
    that the model splits over each group's tensor-parallel ranks (reads the model's metadata)."""
    try:
        cfg = load_config(path)
        if check_model:
            from cluster.engine.tp_splits import check_tp_splits
            check_tp_splits(cfg)
        return cfg
    except ConfigError as e:
        print(f"pdcluster: {e}", file=sys.stderr)
        return None


def cmd_launch(args) -> int:
    from cluster.launch import launcher
    cfg = _config(args.config, check_model=True)
    if cfg is None:
        return 2
    router = {k: v for k, v in (("port", args.port), ("host", args.host)) if v is not None}
    cfg = replace(cfg, router=replace(cfg.router, **router))
    if getattr(args, "backend", "local") == "ray":
        from cluster.launch import ray_backend
        return ray_backend.run(cfg, args.config, _log_dir(args.log_dir), args.address,
                               args.placement)
    return launcher.run(cfg, args.config, _log_dir(args.log_dir))


def _toml_keys(table: dict) -> list[str]:
    return [f"{key} = {json.dumps(value)}" for key, value in table.items() if value is not None]


def cmd_serve(args) -> int:
    """One prefill + one decode worker for MODEL_PATH (default: the embedded model); what is
    not given keeps the config's default."""
    model = {"name": args.model_name, "path": os.path.abspath(args.model_path) if args.model_path else None}
    router = {"host": args.host, "port": args.port}
    lines = ["[model]", *_toml_keys(model), "[router]", *_toml_keys(router),
             "[[prefill]]", "count = 1", "[[decode]]", "count = 1"]
    log_dir = _log_dir(args.log_dir)
    path = os.path.join(log_dir, "serve.toml")        # workers and router read the same file
    os.makedirs(log_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    args.config = path
    args.log_dir = log_dir
    args.port = args.host = None
    return cmd_launch(args)


def cmd_deploy(args) -> int:
    cfg = _config(args.config)
    if cfg is None:
        return 2
    with open(args.config) as f:
        text = f.read()
    manifests = k8s.render(cfg, text, image=args.image, cpus=args.cpus, memory=args.memory)
    if args.no_secret:
        manifests = [m for m in manifests if m["kind"] != "Secret"]
    if args.out is None:
        sys.stdout.write(k8s.to_yaml(manifests))
        return 0
    for path in k8s.write(manifests, args.out):
        print(path)
    return 0


def cmd_keys(args) -> int:
    """Write the cluster's CURVE key pair into DIR for `[security] keys_dir` (copy DIR to every
    host); an existing pair is kept unless --force: replacing it locks out every process that
    still holds the old one."""
    from cluster.wire import curve
    try:
        curve.save_keys(args.dir, curve.CurveKeys.generate(), overwrite=args.force)
    except FileExistsError:
        print(f"pdcluster: {args.dir} already holds CURVE keys; --force replaces them (then copy "
              "the new pair to every host)", file=sys.stderr)
        return 1
    for name in (curve.PUBLIC_FILE, curve.SECRET_FILE):
        print(os.path.join(args.dir, name))
    return 0


def cmd_worker(args, rest: list[str]) -> int:
    name = ROLE_PACKAGES[args.role]
    module = importlib.import_module(name if "." in name else f"{name}.__main__")
    return int(module.main(rest) or 0)


def cmd_router(rest: list[str]) -> int:
    from cluster.router.__main__ import main
    return main(rest)


# ---------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdcluster", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("launch", help="start a whole cluster from a TOML config")
    p.add_argument("config")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--log-dir", default=None, help="default: a new temp directory")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local processes (default) or Ray actors (pip install 'pdcluster[ray]')")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: start a local Ray for this launch)")
    p.add_argument("--placement", default="SPREAD",
                   choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                   help="Ray placement group strategy for the workers (default SPREAD)")
    p = sub.add_parser("serve", help="1 prefill + 1 decode worker, no config file")
    p.add_argument("model_path", nargs="?", default="")
    p.add_argument("--model-name", default=None, help=f"default: {ModelConfigSection().name}")
    p.add_argument("--port", type=int, default=None, help=f"default: {RouterConfig().port}")
    p.add_argument("--host", default=None, help=f"default: {RouterConfig().host}")
    p.add_argument("--log-dir", default=None)
    p = sub.add_parser("deploy", help="render deployment manifests from a TOML config")
    p.add_argument("target", choices=["k8s"])
    p.add_argument("config")
    p.add_argument("--out", default=None, help="write one file per object here (default: stdout)")
    p.add_argument("--image", default=k8s.DEFAULT_IMAGE, help="container image with pdcluster")
    p.add_argument("--cpus", type=int, default=k8s.DEFAULT_CPUS, help="CPU request and limit per worker")
    p.add_argument("--memory", default=k8s.DEFAULT_MEMORY, help="memory request and limit per worker")
    p.add_argument("--no-secret", action="store_true",
                   help="leave out the CURVE key Secret (keep the keys already deployed)")
    p = sub.add_parser("keys", help="write the cluster's CURVE key pair (for [security] keys_dir)")
    p.add_argument("dir", help="keys directory (made 0700; the secret file is 0600)")
    p.add_argument("--force", action="store_true", help="replace a key pair already there")
    p = sub.add_parser("worker", help="one worker process (same as python -m <package>)")
    p.add_argument("--role", required=True, choices=sorted(ROLE_PACKAGES))
    sub.add_parser("router", help="the router alone (python -m cluster.router)", add_help=False)
    bench.add_arguments(sub.add_parser("bench", help="OpenAI-API load generator: TTFT, ITL, output tok/s"))
    profile.add_arguments(sub.add_parser("profile", help="measure a cost profile on a cluster launched from CONFIG"))
    plan.add_arguments(sub.add_parser("plan", help="simulate static layouts under a profile: the best per SLO"))
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["router"]:
        return cmd_router(argv[1:])
    args, rest = build_parser().parse_known_args(argv)
    if args.command == "worker":
        return cmd_worker(args, rest)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return {"launch": cmd_launch, "serve": cmd_serve, "deploy": cmd_deploy, "keys": cmd_keys, "bench": bench.cmd_bench,
            "profile": profile.cmd_profile, "plan": plan.cmd_plan}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
