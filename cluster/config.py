"""Cluster config: TOML -> the frozen dataclasses of `config_types.py` (DESIGN.md shapes).

`load_config(path)` reads a TOML file, `default_config()` gives the defaults (one prefill +
one decode worker). Every unknown key or bad value raises `ConfigError` naming the file, the
key path (`decode[0].num_pages`) and the reason. A worker group may override any
`[scheduler]` key inside its table; the group's SchedulerConfig is then
`dataclasses.replace(shared, **overrides)`, never a mutation. Env override:
PDCLUSTER_LOG_FORWARD_ITERS=0/1 -> scheduler.log_forward_iters (shared and every group).
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import fields, replace

from cluster.dllm_params import DllmParams
from cluster.roles import LOG_FORWARD_ITERS_ENV, ROLES, log_forward_iters_override
from cluster.sampling_params import InvalidParam
from cluster.config_types import (CacheConfig, ClusterConfig, KvTransferConfig, ModelConfigSection,  # noqa: F401
                                   RecoveryConfig, RouterConfig, SchedulerConfig, SecurityConfig, TimeoutsConfig, TracingConfig,
                                   WorkerGroup)


LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = ("float32", "float16", "bfloat16")
POLICIES = ("round_robin", "least_load", "cache_aware")
CURVE_MODES = ("auto", "on", "off")
GROUP_KEYS = ("count", "model", "path", "block_size", "algorithm", "threshold",
              "steps_per_block", "mask_token_id", "gpus", "share_gpus")
KV_BACKENDS = ("auto", "zmq", "shm", "cuda_ipc", "nccl")
DLLM_ONLY_KEYS = ("model", "path", "block_size", "algorithm", "threshold",
                  "steps_per_block", "mask_token_id")
SECTIONS = {"model": ModelConfigSection, "router": RouterConfig, "scheduler": SchedulerConfig,
            "timeouts": TimeoutsConfig, "recovery": RecoveryConfig, "kv_transfer": KvTransferConfig,
            "security": SecurityConfig,
            "tracing": TracingConfig, "cache": CacheConfig}


class ConfigError(ValueError):
    """A config file that cannot be served: names the file, the key path and the reason."""

    def __init__(self, source: str, key: str, reason: str):
        self.source, self.key, self.reason = source, key, reason
        super().__init__(f"{source}: {key}: {reason}")


def _field_types(cls) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls)}


def _check_type(source: str, key: str, value, type_name: str):
    """Coerce the TOML value to the field's type; bool is never an int and vice versa."""
    if type_name == "bool":
        ok = isinstance(value, bool)
    elif type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif type_name == "str":
        ok = isinstance(value, str)
    elif type_name == "Union[bool, str]":
        ok = isinstance(value, (bool, str))
        type_name = "true, false or a string"
    elif type_name == "Optional[str]":
        ok = isinstance(value, str)
    elif type_name == "Optional[int]":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_name == "tuple[int, ...]":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        value = tuple(value) if ok else value
        type_name = "list of int"
    else:  # pragma: no cover - a new field type needs a rule here
        raise ConfigError(source, key, f"no type rule for {type_name}")
    if not ok:
        want = type_name.replace("Optional[", "").rstrip("]")
        raise ConfigError(source, key, f"expected {want}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, table, source: str, prefix: str, base=None, skip=()):
    """Dataclass `cls` from a TOML table; unknown keys fail, known keys are type-checked."""
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, f"expected a table, got {type(table).__name__}")
    types = _field_types(cls)
    kwargs = {}
    for key, value in table.items():
        if key in skip:
            continue
        if key not in types:
            raise ConfigError(source, f"{prefix}.{key}", f"unknown key (known: {', '.join(types)})")
        kwargs[key] = _check_type(source, f"{prefix}.{key}", value, types[key])
    return replace(base, **kwargs) if base is not None else cls(**kwargs)


def _require(cond: bool, source: str, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(source, key, reason)


def _validate_scheduler(s: SchedulerConfig, src: str, p: str) -> None:
    for name in ("page_size", "num_pages", "max_running_requests", "max_prefill_tokens",
                 "decode_log_interval"):
        _require(getattr(s, name) >= 1, src, f"{p}.{name}", "must be >= 1")
    _require(s.threads >= 0, src, f"{p}.threads", "must be >= 0 (0 = cores / workers)")


def _validate(cfg: ClusterConfig) -> None:
    src, m, r, t = cfg.source, cfg.model, cfg.router, cfg.timeouts
    _require(bool(m.name), src, "model.name", "must not be empty")
    _require(m.load_format in LOAD_FORMATS, src, "model.load_format",
             f"{m.load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    _require(m.dtype in DTYPES, src, "model.dtype", f"{m.dtype!r} is not one of {', '.join(DTYPES)}")
    _require(re.fullmatch(r"cpu|cuda(:\d+)?", m.device) is not None, src, "model.device",
             f"{m.device!r} is not cpu, cuda or cuda:N")
    _require(m.max_model_len >= 1, src, "model.max_model_len", "must be >= 1")
    _require(0 <= r.port <= 65535, src, "router.port", "must be in 0..65535")
    _require(bool(r.host), src, "router.host", "must not be empty")
    _require(re.fullmatch(r"(tcp://.+:\d+|ipc://.+|inproc://.+)", r.control) is not None, src,
             "router.control", f"{r.control!r} is not a ZeroMQ endpoint like tcp://HOST:PORT")
    _require(r.policy in POLICIES, src, "router.policy",
             f"{r.policy!r} is not one of {', '.join(POLICIES)}")
    _require(r.max_queued_requests >= 1, src, "router.max_queued_requests", "must be >= 1")
    _require(r.local_prefill_max_tokens >= 0, src, "router.local_prefill_max_tokens", "must be >= 0")
    _require(r.max_body_bytes >= 1024, src, "router.max_body_bytes", "must be >= 1024")
    _require(cfg.recovery.restart_reset_after > 0, src, "recovery.restart_reset_after",
             "must be > 0")
    _require(cfg.security.curve in CURVE_MODES, src, "security.curve",
             f"{cfg.security.curve!r} is not one of {', '.join(CURVE_MODES)}")
    _require(re.fullmatch(r"(https?://[^/\s]+(/\S*)?)?", cfg.tracing.otlp_endpoint) is not None,
             src, "tracing.otlp_endpoint", f"{cfg.tracing.otlp_endpoint!r} is not an http(s) URL "
             "like http://127.0.0.1:4318")
    _require(cfg.kv_transfer.backend in KV_BACKENDS, src, "kv_transfer.backend",
             f"{cfg.kv_transfer.backend!r} is not one of {', '.join(KV_BACKENDS)}")
    _require(cfg.kv_transfer.layerwise in (True, False, "auto"), src, "kv_transfer.layerwise",
             f"{cfg.kv_transfer.layerwise!r} is not one of true, false, \"auto\"")
    _validate_scheduler(cfg.scheduler, src, "scheduler")
    for f in fields(TimeoutsConfig):
        _require(getattr(t, f.name) > 0, src, f"timeouts.{f.name}", "must be > 0")
    _require(t.heartbeat_dead_after > t.heartbeat_interval, src, "timeouts.heartbeat_dead_after",
             "must be greater than timeouts.heartbeat_interval")
    index: dict[str, int] = {}
    for g in cfg.groups:
        i = index[g.role] = index.get(g.role, -1) + 1
        p = f"{g.role}[{i}]"
        _require(g.count >= 0, src, f"{p}.count", "must be >= 0")
        _validate_scheduler(g.scheduler, src, p)
        if g.role != "dllm":
            continue
        _require(bool(g.model), src, f"{p}.model", "a dllm group needs a served model name")
        _require(g.model != m.name, src, f"{p}.model", f"must differ from model.name {m.name!r}")
        try:
            DllmParams.from_group(g)
        except InvalidParam as e:
            raise ConfigError(src, f"{p}.{e.name}", e.reason) from None
        _require(g.mask_token_id is None or g.mask_token_id >= 0, src, f"{p}.mask_token_id",
                 "must be >= 0")
    counts = {role: sum(g.count for g in cfg.groups if g.role == role) for role in ROLES}
    if (counts["prefill"] > 0) != (counts["decode"] > 0):
        lacking = "decode" if counts["prefill"] else "prefill"
        _require(False, src, lacking, "prefill and decode workers come in pairs: add a "
                 f"[[{lacking}]] group or use [[unified]]")
    _require(any(counts.values()), src, "groups", "no workers: add [[prefill]] + [[decode]], "
             "[[unified]] or [[dllm]]")
    from cluster.launch.placement import place_gpus
    place_gpus(cfg)                    # sharing rules; that each GPU exists: the launcher checks


def _parse_group(role: str, i: int, table, scheduler: SchedulerConfig, src: str) -> WorkerGroup:
    p = f"{role}[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(src, p, f"expected a table, got {type(table).__name__}")
    sched_keys = {f.name for f in fields(SchedulerConfig)}
    for key in table:
        if key not in GROUP_KEYS and key not in sched_keys:
            raise ConfigError(src, f"{p}.{key}", "unknown key (known: "
                              f"{', '.join(GROUP_KEYS + tuple(sched_keys))})")
        if role != "dllm" and key in DLLM_ONLY_KEYS:
            raise ConfigError(src, f"{p}.{key}", "only [[dllm]] groups take this key")
    group_sched = _build(SchedulerConfig, {k: v for k, v in table.items() if k in sched_keys},
                         src, p, base=scheduler)
    own = {k: v for k, v in table.items() if k in GROUP_KEYS}
    group = _build(WorkerGroup, own, src, p, base=WorkerGroup(role=role, scheduler=group_sched))
    return group


def _apply_env(cfg: ClusterConfig, env) -> ClusterConfig:
    try:
        on = log_forward_iters_override(env)
    except ValueError as e:
        raise ConfigError(f"${LOG_FORWARD_ITERS_ENV}", "scheduler.log_forward_iters", str(e)) from None
    if on is None:
        return cfg
    groups = tuple(replace(g, scheduler=replace(g.scheduler, log_forward_iters=on))
                   for g in cfg.groups)
    return replace(cfg, scheduler=replace(cfg.scheduler, log_forward_iters=on), groups=groups)


def config_from_dict(data: dict, source: str = "<dict>", env=None) -> ClusterConfig:
    """Validated ClusterConfig from a parsed TOML document (also used by `pdcluster serve`)."""
    sections = {}
    for key, value in data.items():
        if key in SECTIONS:
            sections[key] = _build(SECTIONS[key], value, source, key)
        elif key not in ROLES:
            raise ConfigError(source, key, "unknown table (known: "
                              f"{', '.join(tuple(SECTIONS) + ROLES)})")
    scheduler = sections.get("scheduler", SchedulerConfig())
    groups = []
    for role in ROLES:
        tables = data.get(role, [])
        if isinstance(tables, dict):
            tables = [tables]                      # `[prefill]` written for `[[prefill]]`
        if not isinstance(tables, list):
            raise ConfigError(source, role, "expected [[%s]] tables" % role)
        groups += [_parse_group(role, i, t, scheduler, source) for i, t in enumerate(tables)]
    if not groups:                                 # no group tables: 1 prefill + 1 decode
        groups = [WorkerGroup("prefill", scheduler=scheduler),
                  WorkerGroup("decode", scheduler=scheduler)]
    cfg = ClusterConfig(groups=tuple(groups), source=source, **sections)
    cfg = _apply_env(cfg, os.environ if env is None else env)
    _validate(cfg)
    return cfg


def load_config(path, env=None) -> ClusterConfig:
    """Read and validate a TOML config; every failure is a ConfigError naming file and key."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "-", "file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "-", f"invalid TOML: {e}") from None
    return config_from_dict(data, source, env)


def default_config(env=None) -> ClusterConfig:
    """Defaults of shared/DESIGN.md with one prefill and one decode worker."""
    return config_from_dict({}, "<defaults>", env)
