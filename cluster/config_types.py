"""The config's shapes: frozen dataclasses, one per TOML section, that check themselves.

Every key is an `option(default, help, bounds...)` (config_fields.py) and every section's
`__post_init__` checks its keys, so a section built in code is as safe as one read from a
file; `ClusterConfig` adds the checks that span sections (worker pairs, GPU sharing).
`cluster/config.py` parses TOML into these; import both from `cluster.config`. The lists of
names a key may take are defined here once and imported by whoever needs them.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

from cluster.config_fields import ConfigError, Section, check_fields, default_of, option
from cluster.dllm_params import DllmParams
from cluster.launch.placement import place_gpus
from cluster.roles import ROLES

DEFAULT_MODEL = "smollm2-135m-instruct"              # the embedded weights (engine/loader.py)
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
CPU_WEIGHTS = ("native", "float32")
KV_DTYPES = ("auto", "float32", "bfloat16")
ROUTER_POLICIES = ("round_robin", "least_load", "cache_aware")
KV_BACKENDS = ("zmq", "shm", "cuda_ipc", "nccl")      # what a kv_batch may name on the wire
CURVE_MODES = ("auto", "on", "off")
DLLM_ONLY_FIELDS = ("model", "path", "dllm", "mask_token_id", "prefill", "remote_prefill_min_tokens")  # of WorkerGroup
DLLM_PREFILL = ("local", "remote", "auto")           # who prefills a DLLM prompt
ENDPOINT = r"(tcp://.+:\d+|ipc://.+|inproc://.+)"
HTTP_URL = r"(https?://[^/\s]+(/\S*)?)?"


@dataclass(frozen=True, slots=True)
class ModelConfigSection(Section):
    name: str = option(DEFAULT_MODEL, "served model name; also resolves the embedded "
                       "default weights", nonempty=True)
    path: str = option("", "GGUF file or HF directory; empty = the embedded default weights")
    load_format: str = option("auto", "how to read `path`", choices=LOAD_FORMATS)
    dtype: str = option("float32", "weights and KV dtype (float32 on CPU; bfloat16 on CUDA)",
                        choices=MODEL_DTYPES)
    device: str = option("cpu", "where workers run the model", pattern=r"cpu|cuda(:\d+)?",
                         form="cpu, cuda or cuda:N")
    max_model_len: int = option(4096, "longest prompt + output a request may have", lo=1)
    cpu_weights: str = option("native", "on the CPU, a quantized GGUF file's weights stay packed in their "
                              "quantization (native; bfloat16 activations into each matmul) or are "
                              "dequantized to float32 (the reference path)", choices=CPU_WEIGHTS)
    kv_dtype: str = option("auto", "the KV cache's dtype; auto = `dtype`. bfloat16 under float32 halves the "
                           "bytes attention reads (CPU only; not latent attention), but on a CPU without AMX "
                           "its attention ran slower than float32's", choices=KV_DTYPES)
    tp_invariant: bool = option(False, "TP-invariant numerics: the row-parallel sums (attention o and "
                                "MLP down projections) in float64 at every tp, 1 included, rounded once, "
                                "so the logits do not depend on tp (the default model at tp=3: equal to "
                                "tp=1's, 1.6e-4 apart without); costs a float64 copy of those weights and "
                                '5-18% of a CPU decode step. On the CPU it needs cpu_weights = "float32"')

    def __post_init__(self) -> None:
        check_fields(self)
        check_tp_invariant(self.tp_invariant, self.device, self.cpu_weights, type(self).__name__)
        if self.kv_dtype not in ("auto", self.dtype) and self.device != "cpu":
            raise ConfigError(type(self).__name__, "kv_dtype", f"{self.kv_dtype!r} differs from dtype {self.dtype!r}: "
                              "a KV cache in another dtype than the model's is CPU-only")


def check_tp_invariant(tp_invariant: bool, device: str, cpu_weights: str, source: str = "model") -> None:
    """The packed native CPU kernels do not sum in float64, so tp-invariant numerics need float weights."""
    if tp_invariant and device == "cpu" and cpu_weights == "native":
        raise ConfigError(source, "tp_invariant", 'needs cpu_weights = "float32": the packed native CPU '
                                                  "weights' kernels do not accumulate in float64")


@dataclass(frozen=True, slots=True)
class RouterConfig(Section):
    host: str = option("127.0.0.1", "HTTP bind address", nonempty=True)
    port: int = option(8000, "HTTP port", lo=0, hi=65535)
    control: str = option("tcp://127.0.0.1:0", "ZeroMQ endpoint workers connect to; port 0 = a "
                          "free port", pattern=ENDPOINT, form="a ZeroMQ endpoint like tcp://HOST:PORT")
    policy: str = option("round_robin", "how a worker is picked for a request", choices=ROUTER_POLICIES)
    local_prefill_max_tokens: int = option(0, "> 0: a decode worker holding all but this many tokens "
                                           "of a prompt prefills the rest itself", lo=0)
    api_key: str = option("", "bearer key the HTTP API asks for; empty = no auth")
    max_queued_requests: int = option(1024, "requests waiting beyond this get 503 with "
                                      "Retry-After", lo=1)
    max_body_bytes: int = option(8 << 20, "larger request bodies get 413, never read whole", lo=1024)
    metrics_require_key: bool = option(False, "/metrics asks for api_key too")
    api_servers: int = option(0, "HTTP front-end processes over one dispatcher; 0 = sized to the "
                              "machine (one per 4 cores, 1 to 8: a single process below 8 cores)", lo=0, hi=64)


@dataclass(frozen=True, slots=True)
class SchedulerConfig(Section):
    overlap: bool = option(True, "overlap scheduling: launch batch N+1 before processing N's result")
    log_forward_iters: bool = option(True, "end batch log lines with ` [N]`, the forward iteration; "
                                     "PDCLUSTER_LOG_FORWARD_ITERS=0/1 overrides")
    page_size: int = option(16, "tokens per KV page", lo=1)
    num_pages: int = option(2048, "KV pages in a worker's pool", lo=1)
    max_running_requests: int = option(64, "requests in one running batch at most", lo=1)
    max_prefill_tokens: int = option(4096, "new tokens in one prefill batch at most", lo=1)
    decode_log_interval: int = option(1, "a Decode batch line for the first decode iteration, then every N "
                                          "(1 = every one; SGLang's default is 40)", lo=1)
    threads: int = option(0, "torch threads per worker; 0 = cores / workers on this host", lo=0)


@dataclass(frozen=True, slots=True)
class TimeoutsConfig(Section):
    register: float = option(120.0, "seconds the launcher waits for every worker to register", gt=0)
    heartbeat_interval: float = option(1.0, "seconds between a worker's heartbeats", gt=0)
    heartbeat_dead_after: float = option(3.0, "a worker silent this long is dead (> heartbeat_interval)",
                                         gt=0)
    decode_ready: float = option(30.0, "seconds prefill holds a request waiting for decode's pages", gt=0)
    kv_transfer: float = option(30.0, "seconds a KV handoff may take before it fails", gt=0)
    request: float = option(600.0, "seconds a request may take end to end", gt=0)
    router_lost: float = option(30.0, "a worker that cannot reach its router this long exits", gt=0)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.heartbeat_dead_after > self.heartbeat_interval:
            raise ConfigError(type(self).__name__, "heartbeat_dead_after",
                              "must be greater than timeouts.heartbeat_interval")


@dataclass(frozen=True, slots=True)
class RecoveryConfig(Section):
    restart_workers: bool = option(True, "the launcher restarts a worker that dies")
    resume_on_decode_failure: bool = option(True, "re-prefill prompt + sent tokens on another decode "
                                            "worker when decode fails")
    restart_reset_after: float = option(60.0, "a worker healthy this long gets its restart budget "
                                        "back", gt=0)


@dataclass(frozen=True, slots=True)
class KvTransferConfig(Section):
    backend: str = option("auto", "KV transfer backend (cluster/kv_transfer); auto picks per peer",
                          choices=("auto",) + KV_BACKENDS)
    verify: bool = option(False, "checksum every transfer, a mismatch is prefilled again; off by "
                          "default: it doubles a device-to-device handoff (BENCHMARKS.md)")
    layerwise: Union[bool, str] = option("auto", "send each layer's KV as its forward finishes; "
                                         "auto = for peers reached through zmq, where it measures "
                                         "faster", choices=(True, False, "auto"))


@dataclass(frozen=True, slots=True)
class SecurityConfig(Section):
    curve: str = option("auto", "CURVE encryption of ZeroMQ sockets; auto = on when any bind is not "
                        "loopback", choices=CURVE_MODES)
    keys_dir: str = option("", "where the launcher writes / workers read the CURVE keys "
                           "(`pdcluster keys DIR`)")


@dataclass(frozen=True, slots=True)
class TracingConfig(Section):
    otlp_endpoint: str = option("", "OTLP/HTTP collector; empty = no export (phases are kept for "
                                "/debug)", pattern=HTTP_URL, form="an http(s) URL like http://127.0.0.1:4318")


@dataclass(frozen=True, slots=True)
class CacheConfig(Section):
    prefix_cache: bool = option(True, "radix prefix cache on prefill, unified and decode workers")
    host_tier_gb: float = option(0.0, "second prefix-cache tier in host memory (pinned on CUDA), GB "
                                 "per worker (per rank of a tensor-parallel worker: each keeps its "
                                 "own KV heads); 0 = off", lo=0)


@dataclass(frozen=True, slots=True)
class SloConfig(Section):
    ttft: Optional[float] = option(None, "target time to first token, seconds; unset = no TTFT "
                                   "target. Set: a prompt the prefill workers are predicted to miss "
                                   "it with goes to a decode worker that would be done sooner", gt=0)
    tpot: Optional[float] = option(None, "target mean time per output token after the first, "
                                   "seconds; unset = no TPOT target. A decode step carrying a prefill "
                                   "chunk is sized to stay within it", gt=0)
    window: float = option(60.0, "seconds of finished requests the attainment metrics cover", gt=0)

    @property
    def is_set(self) -> bool:
        return self.ttft is not None or self.tpot is not None


@dataclass(frozen=True, slots=True)
class PlannerConfig(Section):
    enabled: bool = option(False, "the router switches worker roles to keep the [slo] targets")
    interval: float = option(10.0, "seconds between decisions (and after a switch before the next)",
                             gt=0)
    hysteresis: float = option(0.1, "relative margin around a target before acting (0.1: act above "
                               "110% of a target; switch back below 90% of both)", lo=0, hi=0.9)
    percentile: float = option(90.0, "the percentile of the SLO window's TTFT and TPOT held against the "
                               "targets (a tail, as SLOs are stated); 0 = their means", lo=0, hi=100)


@dataclass(frozen=True, slots=True)
class WorkerGroup(Section):
    """One `[[prefill]]`, `[[decode]]`, `[[unified]]` or `[[dllm]]` table."""
    role: str = option(help="the role of this group's workers", choices=ROLES)
    count: int = option(1, "workers in this group", lo=0)
    scheduler: SchedulerConfig = option(help="[scheduler] with this table's overrides",
                                        factory=SchedulerConfig)
    model: Optional[str] = option(None, "dllm: served model name (must differ from model.name)")
    path: str = option("", "dllm: weights; empty = the same as [model]")
    dllm: DllmParams = option(help="dllm: how its requests' blocks are filled (the keys below sit "
                              "in the group's table)", factory=DllmParams)
    mask_token_id: Optional[int] = option(None, "dllm: placeholder token for causal models without "
                                          "a mask token", lo=0)
    prefill: str = option("local", "dllm: who prefills a prompt: the DLLM worker itself (local), a prefill "
                          "worker that hands the KV over (remote), or remote from "
                          "remote_prefill_min_tokens prompt tokens or while the DLLM worker is busy (auto)",
                          choices=DLLM_PREFILL)
    remote_prefill_min_tokens: int = option(256, "dllm, prefill = auto: prompts of at least this many tokens "
                                            "are prefilled remotely even when the DLLM worker is idle", lo=1)
    gpus: tuple[int, ...] = option((), "GPUs of this group's workers, dealt round-robin "
                                   "(launch/placement.py)")
    share_gpus: bool = option(False, "may a GPU run several workers (of this group or another)?")
    tp: int = option(1, "tensor-parallel ranks per worker (one process each); gpus then lists "
                     "count x tp devices, a worker's ranks on consecutive ones", lo=1)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tp > 1 and self.gpus and len(self.gpus) < self.count * self.tp:
            raise ConfigError(type(self).__name__, "gpus", f"{len(self.gpus)} GPU(s) for {self.count} worker(s) "
                              f"x tp={self.tp}: needs {self.count * self.tp}")
        if self.role == "dllm" and not self.model:
            raise ConfigError(type(self).__name__, "model", "a dllm group needs a served model name")
        for f in fields(self):
            if self.role != "dllm" and f.name in DLLM_ONLY_FIELDS and getattr(self, f.name) != default_of(f):
                raise ConfigError(type(self).__name__, f.name, "only [[dllm]] groups take this key")


def _default_groups() -> tuple[WorkerGroup, ...]:
    return (WorkerGroup("prefill"), WorkerGroup("decode"))


@dataclass(frozen=True, slots=True)
class ClusterConfig(Section):
    model: ModelConfigSection = option(help="[model]", factory=ModelConfigSection)
    router: RouterConfig = option(help="[router]", factory=RouterConfig)
    scheduler: SchedulerConfig = option(help="[scheduler]: shared defaults, overridable per group",
                                        factory=SchedulerConfig)
    timeouts: TimeoutsConfig = option(help="[timeouts], in seconds", factory=TimeoutsConfig)
    recovery: RecoveryConfig = option(help="[recovery]", factory=RecoveryConfig)
    kv_transfer: KvTransferConfig = option(help="[kv_transfer]", factory=KvTransferConfig)
    security: SecurityConfig = option(help="[security]", factory=SecurityConfig)
    tracing: TracingConfig = option(help="[tracing]", factory=TracingConfig)
    cache: CacheConfig = option(help="[cache]", factory=CacheConfig)
    slo: SloConfig = option(help="[slo]: latency targets (optional); attainment metrics when set",
                            factory=SloConfig)
    planner: PlannerConfig = option(help="[planner]: role switches from the SLO signals (off by default)",
                                    factory=PlannerConfig)
    groups: tuple[WorkerGroup, ...] = option(help="the worker groups, in role order",
                                             factory=_default_groups)
    source: str = option("<defaults>", "file the config came from, for error messages")

    def __post_init__(self) -> None:
        check_fields(self, self.source)
        for key, g in self.group_keys():
            if g.role == "dllm" and g.model == self.model.name:
                raise ConfigError(self.source, f"{key}.model", f"must differ from model.name {self.model.name!r}")
        counts = {role: sum(g.count for g in self.groups if g.role == role) for role in ROLES}
        self.check_remote_prefill(counts["prefill"])
        # prefill workers without decode ones serve only DLLM groups that prefill remotely
        lone_prefill = counts["prefill"] > 0 and not counts["decode"] and not self.has_remote_dllm_prefill
        if counts["decode"] > 0 and not counts["prefill"] or lone_prefill:
            lacking = "decode" if counts["prefill"] else "prefill"
            raise ConfigError(self.source, lacking, "prefill and decode workers come in pairs: add a "
                              f"[[{lacking}]] group or use [[unified]]")
        if not any(counts.values()):
            raise ConfigError(self.source, "groups", "no workers: add [[prefill]] + [[decode]], "
                              "[[unified]] or [[dllm]]")
        if self.planner.enabled and not self.slo.is_set:
            raise ConfigError(self.source, "planner.enabled", "the planner needs an [slo] ttft or tpot target")
        place_gpus(self)               # sharing rules; that each GPU exists: the launcher checks

    @property
    def has_remote_dllm_prefill(self) -> bool:
        """Some DLLM group may hand its prompts to the prefill workers."""
        return any(g.role == "dllm" and g.count and g.prefill != "local" for g in self.groups)

    def check_remote_prefill(self, num_prefill_workers: int) -> None:
        """A DLLM group prefilling remotely needs prefill workers holding its weights (they
        load [model]'s: the KV layouts must match)."""
        for key, g in self.group_keys():
            if g.role != "dllm" or g.prefill == "local" or not g.count:
                continue
            if not num_prefill_workers:
                raise ConfigError(self.source, f"{key}.prefill", f"prefill = {g.prefill!r} needs a [[prefill]] "
                                  "group with workers")
            if g.path and g.path != self.model.path:
                raise ConfigError(self.source, f"{key}.prefill", f"prefill = {g.prefill!r}: prefill workers "
                                  f"load model.path {self.model.path or '(the default weights)'!r}, not this "
                                  f"group's path {g.path!r}; their KV would not fit (leave path empty or use "
                                  "prefill = \"local\")")
            if g.tp > 1:
                raise ConfigError(self.source, f"{key}.prefill", f"prefill = {g.prefill!r} with tp={g.tp}: a KV "
                                  "handoff moves one rank's pool today")

    def group_keys(self) -> list[tuple[str, WorkerGroup]]:
        """(key, group) for every group table: prefill[0], prefill[1], decode[0], ..."""
        out, index = [], {}
        for g in self.groups:
            i = index[g.role] = index.get(g.role, -1) + 1
            out.append((f"{g.role}[{i}]", g))
        return out

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
