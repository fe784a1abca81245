"""Per-worker stats lines and gauges, labelled with the iteration that launched the batch.

Under overlap a batch is reported after later batches were launched, so the label is
`batch.forward_iter` (snapshotted by `Scheduler.run_batch`), falling back to the live
`forward_ct` only when there is no batch or no snapshot.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from cluster.runtime.schedule_batch import ScheduleBatch

logger = logging.getLogger("pdcluster.scheduler")

KV_TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def log_forward_iters_enabled(configured: bool) -> bool:
    env = os.environ.get("PDCLUSTER_LOG_FORWARD_ITERS")
    if env is None or env == "":
        return configured
    return env.strip().lower() not in ("0", "false", "no", "off")


@dataclass(slots=True)
class PrefillStats:
    num_new_seqs: int
    num_new_tokens: int
    num_cached_tokens: int = 0
    token_usage: float = 0.0
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_bootstrap_reqs: Optional[int] = None   # disaggregated prefill only
    num_inflight_reqs: Optional[int] = None    # disaggregated prefill only


@dataclass(slots=True)
class DecodeStats:
    num_running_reqs: int
    num_tokens: int
    token_usage: float = 0.0
    num_queue_reqs: int = 0
    num_prealloc_reqs: Optional[int] = None    # decode worker only
    num_transfer_reqs: Optional[int] = None    # decode worker only
    num_retracted_reqs: Optional[int] = None   # decode worker only


class SchedulerMetricsMixin:
    """Needs `self.forward_ct`, `self.worker_id`, `self.log_forward_iters`, `self.decode_log_interval`."""

    def init_metrics(self) -> None:
        self.gauges: dict[str, float] = {
            "num_running_reqs": 0, "num_queue_reqs": 0, "token_usage": 0.0, "gen_throughput": 0.0,
            "forward_iter": 0, "num_bootstrap_reqs": 0, "num_inflight_reqs": 0,
            "num_prealloc_reqs": 0, "num_transfer_reqs": 0, "num_retracted_reqs_total": 0,
            "kv_transfer_bytes_total": 0, "kv_transfer_seconds_sum": 0.0,
            "kv_transfer_seconds_count": 0, "protocol_errors_total": 0,
        }
        for le in KV_TRANSFER_BUCKETS:
            self.gauges[f"kv_transfer_seconds_bucket_{le}"] = 0
        self.reported_iters: list[tuple[str, int]] = []   # (kind, iteration), for tests and debugging
        self._last_prefill_log = time.perf_counter()
        self._last_decode_log = time.perf_counter()
        self._decode_tokens_since_log = 0
        self._num_decode_batches = 0

    def iteration_of(self, batch: Optional[ScheduleBatch]) -> int:
        if batch is not None and batch.forward_iter is not None:
            return batch.forward_iter
        return self.forward_ct

    def _batch_label(self, kind: str, it: int) -> str:
        return f"{kind} batch [{it}]" if self.log_forward_iters else f"{kind} batch"

    def report_prefill_stats(self, batch: Optional[ScheduleBatch], stats: PrefillStats) -> str:
        it = self.iteration_of(batch)
        now = time.perf_counter()
        throughput = stats.num_new_tokens / max(now - self._last_prefill_log, 1e-9)
        self._last_prefill_log = now
        parts = [self._batch_label("Prefill", it), f"#new-seq: {stats.num_new_seqs}",
                 f"#new-token: {stats.num_new_tokens}", f"#cached-token: {stats.num_cached_tokens}",
                 f"token usage: {stats.token_usage:.2f}", f"#running-req: {stats.num_running_reqs}",
                 f"#queue-req: {stats.num_queue_reqs}"]
        if stats.num_bootstrap_reqs is not None:
            parts.append(f"#bootstrap-req: {stats.num_bootstrap_reqs}")
        if stats.num_inflight_reqs is not None:
            parts.append(f"#inflight-req: {stats.num_inflight_reqs}")
        parts.append(f"input throughput (token/s): {throughput:.2f}")
        line = ", ".join(parts)
        logger.info(line)
        self.reported_iters.append(("prefill", it))
        self.gauges.update(forward_iter=it, token_usage=stats.token_usage,
                           num_running_reqs=stats.num_running_reqs, num_queue_reqs=stats.num_queue_reqs)
        if stats.num_bootstrap_reqs is not None:
            self.gauges["num_bootstrap_reqs"] = stats.num_bootstrap_reqs
        if stats.num_inflight_reqs is not None:
            self.gauges["num_inflight_reqs"] = stats.num_inflight_reqs
        return line

    def report_decode_stats(self, batch: Optional[ScheduleBatch], stats: DecodeStats) -> Optional[str]:
        """Counts every decode batch; logs one line every `decode_log_interval` batches."""
        it = self.iteration_of(batch)
        self._num_decode_batches += 1
        self._decode_tokens_since_log += batch.batch_size if batch is not None else stats.num_running_reqs
        self.gauges.update(forward_iter=it, token_usage=stats.token_usage,
                           num_running_reqs=stats.num_running_reqs, num_queue_reqs=stats.num_queue_reqs)
        for key in ("num_prealloc_reqs", "num_transfer_reqs"):
            if getattr(stats, key) is not None:
                self.gauges[key] = getattr(stats, key)
        if self._num_decode_batches % max(1, self.decode_log_interval) != 0:
            return None
        now = time.perf_counter()
        gen_throughput = self._decode_tokens_since_log / max(now - self._last_decode_log, 1e-9)
        self._last_decode_log, self._decode_tokens_since_log = now, 0
        self.gauges["gen_throughput"] = gen_throughput
        parts = [self._batch_label("Decode", it), f"#running-req: {stats.num_running_reqs}",
                 f"#token: {stats.num_tokens}", f"token usage: {stats.token_usage:.2f}"]
        if stats.num_prealloc_reqs is not None:
            parts.append(f"#prealloc-req: {stats.num_prealloc_reqs}")
        if stats.num_transfer_reqs is not None:
            parts.append(f"#transfer-req: {stats.num_transfer_reqs}")
        if stats.num_retracted_reqs is not None:
            parts.append(f"#retracted-req: {stats.num_retracted_reqs}")
        parts += [f"gen throughput (token/s): {gen_throughput:.2f}", f"#queue-req: {stats.num_queue_reqs}"]
        line = ", ".join(parts)
        logger.info(line)
        self.reported_iters.append(("decode", it))
        return line

    def record_kv_transfer(self, num_bytes: int, seconds: Optional[float] = None) -> None:
        """Bytes a worker sent (prefill) or received (decode); seconds only where the
        whole transfer is seen: prefill, from sending a kv_batch to its kv_ack."""
        self.gauges["kv_transfer_bytes_total"] += num_bytes
        if seconds is None:
            return
        self.gauges["kv_transfer_seconds_sum"] += seconds
        self.gauges["kv_transfer_seconds_count"] += 1
        for le in KV_TRANSFER_BUCKETS:
            if seconds <= le:
                self.gauges[f"kv_transfer_seconds_bucket_{le}"] += 1
