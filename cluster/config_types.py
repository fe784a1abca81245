"""The config's shapes: frozen dataclasses, one per TOML section (pinned in shared/DESIGN.md).

`cluster/config.py` loads and validates them; import both from `cluster.config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True, slots=True)
class ModelConfigSection:
    name: str = "smollm2-135m-instruct"
    path: str = ""
    load_format: str = "auto"          # auto | gguf | safetensors | dummy
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int = 4096


@dataclass(frozen=True, slots=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    control: str = "tcp://127.0.0.1:0"
    policy: str = "round_robin"        # round_robin | least_load | cache_aware
    local_prefill_max_tokens: int = 0  # > 0: decode prefills short uncached remainders itself
    api_key: str = ""
    max_queued_requests: int = 1024
    max_body_bytes: int = 8 << 20      # larger request bodies: 413, never read whole
    metrics_require_key: bool = False  # /metrics asks for api_key too


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    overlap: bool = True
    log_forward_iters: bool = True
    page_size: int = 16
    num_pages: int = 2048
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096
    decode_log_interval: int = 1
    threads: int = 0                   # torch threads per worker; 0 = cores / workers on this host


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    register: float = 120.0
    heartbeat_interval: float = 1.0
    heartbeat_dead_after: float = 3.0
    decode_ready: float = 30.0
    kv_transfer: float = 30.0
    request: float = 600.0
    router_lost: float = 30.0          # a worker that cannot reach its router this long exits


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    restart_workers: bool = True
    resume_on_decode_failure: bool = True
    restart_reset_after: float = 60.0  # a worker healthy this long gets its restart budget back


@dataclass(frozen=True, slots=True)
class KvTransferConfig:
    backend: str = "auto"              # auto | zmq | shm | cuda_ipc | nccl (cluster/kv_transfer)
    verify: bool = False               # checksum every transfer (a mismatch is prefilled again); off by
                                       # default: it doubles a device-to-device handoff (BENCHMARKS.md)
    layerwise: Union[bool, str] = "auto"   # send each layer's KV as its forward finishes
                                       # (kv_transfer/layerwise.py): true | false | "auto" (for
                                       # peers reached through zmq, where it measures faster)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    curve: str = "auto"                # auto (on when any bind is not loopback) | on | off
    keys_dir: str = ""                 # where the launcher writes / workers read the CURVE keys


@dataclass(frozen=True, slots=True)
class TracingConfig:
    otlp_endpoint: str = ""            # OTLP/HTTP collector; empty = no export (phases kept for /debug)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    prefix_cache: bool = True          # radix prefix cache on prefill, unified and decode workers


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """One `[[prefill]]`, `[[decode]]`, `[[unified]]` or `[[dllm]]` table."""
    role: str
    count: int = 1
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model: Optional[str] = None        # served name (dllm)
    path: str = ""                     # dllm weights; empty = same as [model]
    block_size: int = 1
    algorithm: str = "low_confidence"  # low_confidence | fixed_steps
    threshold: float = 0.9
    steps_per_block: int = 1
    mask_token_id: Optional[int] = None  # placeholder for causal models without a mask token
    gpus: tuple[int, ...] = ()         # GPUs of this group's workers, dealt round-robin (launch/placement.py)
    share_gpus: bool = False           # may a GPU run several workers (of this group or another)?


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    model: ModelConfigSection = field(default_factory=ModelConfigSection)
    router: RouterConfig = field(default_factory=RouterConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    kv_transfer: KvTransferConfig = field(default_factory=KvTransferConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    groups: tuple[WorkerGroup, ...] = ()
    source: str = "<defaults>"         # file the config came from, for error messages

    def worker_ids(self) -> list[tuple[str, WorkerGroup]]:
        """(worker_id, group) for every worker: prefill-0, prefill-1, decode-0, ..."""
        out, counters = [], {}
        for g in self.groups:
            for _ in range(g.count):
                k = counters.get(g.role, 0)
                counters[g.role] = k + 1
                out.append((f"{g.role}-{k}", g))
        return out

    def group_of(self, worker_id: str) -> WorkerGroup:
        for wid, g in self.worker_ids():
            if wid == worker_id:
                return g
        raise KeyError(f"{self.source}: no worker {worker_id!r} in this config")
