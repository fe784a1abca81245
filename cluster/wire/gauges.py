"""`WorkerGauges`: the metrics a worker reports with each heartbeat, declared once.

Each field is one metric (exported by the router as `pdcluster:<field>` with labels `role`
and `worker`) and declares its kind and help text; the router exports from this declaration
(`WorkerGauges.declared()`), so a metric exists only where it is declared here and a misspelt
name fails where the gauges are built, not silently on a dashboard. A field a role does not
report stays None and is not exported for that worker.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"


class MetricDecl(NamedTuple):
    name: str                          # without the `pdcluster:` prefix
    kind: str                          # GAUGE | COUNTER | HISTOGRAM
    help: str
    label: Optional[str] = None        # a counter by label value ({value: n}), e.g. "reason"


@dataclass(frozen=True, slots=True)
class HistogramSample:
    """A worker's histogram as it stands: per-bucket counts (the last is above every bound)."""
    name: str                                     # metric name without the prefix
    bounds: list                                  # upper bounds, ascending
    counts: list                                  # len(bounds) + 1 counts, not cumulative
    sum: float
    count: int

    def __post_init__(self) -> None:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError(f"{len(self.counts)} counts for {len(self.bounds)} bounds")
        if list(self.bounds) != sorted(self.bounds) or sum(self.counts) != self.count:
            raise ValueError("bounds must ascend and counts must add up to count")


def _metric(kind: str, help: str, label: Optional[str] = None):
    return field(default=None, metadata={"kind": kind, "help": help, "label": label})


@dataclass(frozen=True, slots=True)
class WorkerGauges:
    """One heartbeat's metrics: None where the worker's role does not report the metric."""
    forward_iter: Optional[int] = _metric(GAUGE, "Forward iteration of the last reported batch.")
    num_running_reqs: Optional[int] = _metric(GAUGE, "Requests in the running (decode or DLLM) batch.")
    num_queue_reqs: Optional[int] = _metric(GAUGE, "Requests waiting to be scheduled.")
    token_usage: Optional[float] = _metric(GAUGE, "KV pages held by live requests / pages in the pool.")
    gen_throughput: Optional[float] = _metric(GAUGE, "Generated tokens per second (last decode log interval).")
    prefix_cache_hit_rate: Optional[float] = _metric(GAUGE, "Prompt tokens found in the prefix cache / "
                                                            "prompt tokens looked up.")
    prefix_cache_hit_tokens_total: Optional[dict] = _metric(COUNTER, "Prompt tokens found in the prefix cache, "
                                                            "by the tier they came from (the sum is "
                                                            "every hit).", label="tier")
    prefix_cache_query_tokens_total: Optional[int] = _metric(COUNTER, "Prompt tokens looked up in the prefix "
                                                                      "cache.")
    host_tier_bytes_total: Optional[dict] = _metric(COUNTER, "KV bytes copied between the device and the "
                                                    "host tier of the prefix cache.", label="direction")
    host_tier_usage: Optional[float] = _metric(GAUGE, "Host-tier pages in use / host-tier pages.")
    protocol_errors_total: Optional[int] = _metric(COUNTER, "Wire messages dropped as malformed.")
    rejected_frames_total: Optional[dict] = _metric(COUNTER, "Refused handshakes and frames by reason.",
                                                    label="reason")
    num_queue_tokens: Optional[int] = _metric(GAUGE, "Prompt tokens waiting to be prefilled here, those of "
                                                     "forwards launched and not yet done included.")
    prefill_throughput: Optional[float] = _metric(GAUGE, "Prefill: prompt tokens per second of forward time "
                                                         "over its recent batches.")
    decode_side_prefill_rate: Optional[float] = _metric(GAUGE, "Decode: prompt tokens per second it could "
                                                               "prefill beside its running batch, each step "
                                                               "within the [slo] TPOT target by its step cost "
                                                               "model; 0 = no headroom.")
    decode_side_prefill_tokens_total: Optional[int] = _metric(COUNTER, "Decode: prompt tokens it prefilled "
                                                                       "itself (decode-side prefill).")
    num_bootstrap_reqs: Optional[int] = _metric(GAUGE, "Prefill: requests waiting for decode_ready.")
    num_inflight_reqs: Optional[int] = _metric(GAUGE, "Prefill: requests whose KV awaits its kv_ack.")
    num_prealloc_reqs: Optional[int] = _metric(GAUGE, "Decode: requests waiting for KV pages to reserve.")
    num_transfer_reqs: Optional[int] = _metric(GAUGE, "Decode: requests whose KV is arriving.")
    num_retracted_reqs_total: Optional[int] = _metric(COUNTER, "Decode: requests retracted when pages ran out.")
    kv_transfer_bytes_total: Optional[int] = _metric(COUNTER, "KV bytes sent (prefill) or received "
                                                     "(decode; on every rank).")
    kv_transfer_failures_total: Optional[dict] = _metric(COUNTER, "KV transfers that failed, by reason.",
                                                         label="reason")
    kv_transfer_seconds: Optional[HistogramSample] = _metric(
        HISTOGRAM, "Prefill: from the first KV byte sent to the kv_ack.")
    dllm_tokens_per_forward: Optional[float] = _metric(GAUGE, "DLLM: tokens committed per block forward.")
    dllm_forwards_per_block: Optional[float] = _metric(GAUGE, "DLLM: forwards per finished block.")

    @staticmethod
    def declared() -> Iterator[MetricDecl]:
        """Every worker metric: name, kind, help text and label, in declaration order."""
        for f in dataclasses.fields(WorkerGauges):
            yield MetricDecl(f.name, f.metadata["kind"], f.metadata["help"], f.metadata["label"])

    def reported(self) -> Iterator[tuple[MetricDecl, object]]:
        """(declaration, value) of every metric this worker reports (not None)."""
        for decl in WorkerGauges.declared():
            value = getattr(self, decl.name)
            if value is not None:
                yield decl, value
