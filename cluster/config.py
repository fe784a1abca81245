"""Cluster config: TOML -> the frozen dataclasses of `config_types.py`.

`load_config(path)` reads a TOML file, `default_config()` gives the defaults (one prefill +
one decode worker). This module only parses: the types check their own keys and bounds, and
every error is re-told as a `ConfigError` naming the file, the key path
(`decode[0].num_pages`) and the reason. A worker group may override any `[scheduler]` key
inside its table; the group's SchedulerConfig is then `dataclasses.replace(shared,
**overrides)`, never a mutation. Env override (applied here only):
PDCLUSTER_LOG_FORWARD_ITERS=0/1 -> scheduler.log_forward_iters (shared and every group).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import fields, replace

from cluster.config_fields import ConfigError
from cluster.dllm_params import DllmParams
from cluster.sampling_params import InvalidParam
from cluster.roles import LOG_FORWARD_ITERS_ENV, ROLES, log_forward_iters_override
from cluster.config_types import (DLLM_ONLY_FIELDS, CacheConfig, ClusterConfig, KvTransferConfig, ModelConfigSection, PlannerConfig,  # noqa: F401
                                   RecoveryConfig, RouterConfig, SchedulerConfig, SecurityConfig, SloConfig, TimeoutsConfig,
                                   TracingConfig, WorkerGroup)

SECTIONS = {f.name: f.default_factory for f in fields(ClusterConfig) if f.name not in ("groups", "source")}
SCHEDULER_KEYS = tuple(f.name for f in fields(SchedulerConfig))
DLLM_KEYS = tuple(f.name for f in fields(DllmParams))             # flat in a [[dllm]] table
GROUP_KEYS = tuple(f.name for f in fields(WorkerGroup) if f.name not in ("role", "scheduler", "dllm")) + DLLM_KEYS
DLLM_ONLY_KEYS = tuple(k for k in DLLM_ONLY_FIELDS if k != "dllm") + DLLM_KEYS


def _build(cls, table, source: str, prefix: str, base=None):
    """Dataclass `cls` (or `base` replaced) from a TOML table: unknown keys fail here, values
    are checked by the type itself and its error is re-told with the file and the key path."""
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, f"expected a table, got {type(table).__name__}")
    known = [f.name for f in fields(cls)]
    for key in table:
        if key not in known:
            raise ConfigError(source, f"{prefix}.{key}", f"unknown key (known: {', '.join(known)})")
    try:
        return replace(base, **table) if base is not None else cls(**table)
    except ConfigError as e:
        raise e.within(source, prefix) from None


def _parse_group(role: str, i: int, table, scheduler: SchedulerConfig, src: str) -> WorkerGroup:
    p = f"{role}[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(src, p, f"expected a table, got {type(table).__name__}")
    for key in table:
        if key not in GROUP_KEYS and key not in SCHEDULER_KEYS:
            raise ConfigError(src, f"{p}.{key}", "unknown key (known: "
                              f"{', '.join(GROUP_KEYS + SCHEDULER_KEYS)})")
        if role != "dllm" and key in DLLM_ONLY_KEYS:
            raise ConfigError(src, f"{p}.{key}", "only [[dllm]] groups take this key")
    group_sched = _build(SchedulerConfig, {k: v for k, v in table.items() if k in SCHEDULER_KEYS},
                         src, p, base=scheduler)
    try:
        dllm = DllmParams(**{k: v for k, v in table.items() if k in DLLM_KEYS})
    except InvalidParam as e:
        raise ConfigError(src, f"{p}.{e.name}", e.reason) from None
    own = {k: v for k, v in table.items() if k in GROUP_KEYS and k not in DLLM_KEYS}
    return _build(WorkerGroup, {"role": role, "scheduler": group_sched, "dllm": dllm, **own}, src, p)


def _log_forward_iters_env(env) -> "bool | None":
    try:
        return log_forward_iters_override(env)
    except ValueError as e:
        raise ConfigError(f"${LOG_FORWARD_ITERS_ENV}", "scheduler.log_forward_iters", str(e)) from None


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
    on = _log_forward_iters_env(os.environ if env is None else env)
    if on is not None:                             # over [scheduler] and every group's own value
        sections["scheduler"] = replace(scheduler, log_forward_iters=on)
        groups = [replace(g, scheduler=replace(g.scheduler, log_forward_iters=on)) for g in groups]
    return ClusterConfig(groups=tuple(groups), source=source, **sections)


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
    """Every key at its default, with one prefill and one decode worker."""
    return config_from_dict({}, "<defaults>", env)
