"""Per-worker stats lines, labelled with the iteration that launched the batch, and the
small stats objects each role owns.

Under overlap a batch is reported after later batches were launched, so the label is
`batch.forward_iter` (snapshotted by `Scheduler.run_batch`); the scheduler passes it in
(`Scheduler.iteration_of`). `IterationStats` writes the `Prefill batch [N]` / `Decode
batch [N]` lines and keeps the gauges they set (`forward_iter`, `gen_throughput`); the
queue gauges are read live by each role's `heartbeat_gauges`. `KvTransferStats` belongs to
the roles that move KV (prefill, decode); its time histogram travels as a typed
heartbeat field.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

from cluster.histogram import Histogram
from cluster.wire.messages import KvFailure

logger = logging.getLogger("pdcluster.scheduler")

KV_TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_REPORTED_ITERS = 8192           # reported_iters kept for tests and debugging


@dataclass(slots=True)
class PrefillStats:
    num_new_seqs: int
    num_new_tokens: int
    cached_len: Optional[int] = 0              # prefix-cache hits (#cached-token); None: no prefix cache
    num_prefix_tokens: Optional[int] = None    # DLLM: all earlier KV the round attends (#prefix-token)
    token_usage: float = 0.0
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_bootstrap_reqs: Optional[int] = None   # disaggregated prefill only
    num_inflight_reqs: Optional[int] = None    # disaggregated prefill only

    @classmethod
    def of_batch(cls, batch, token_usage: float, num_running_reqs: int, num_queue_reqs: int,
                 **role) -> "PrefillStats":
        return cls(num_new_seqs=sum(batch.is_last_chunk), num_new_tokens=batch.num_tokens,
                   cached_len=batch.cached_len, token_usage=token_usage,
                   num_running_reqs=num_running_reqs, num_queue_reqs=num_queue_reqs, **role)


@dataclass(slots=True)
class DecodeStats:
    num_running_reqs: int
    num_tokens: int
    token_usage: float = 0.0
    num_queue_reqs: int = 0
    num_prealloc_reqs: Optional[int] = None    # decode worker only
    num_transfer_reqs: Optional[int] = None    # decode worker only
    num_retracted_reqs: Optional[int] = None   # decode worker only

    @classmethod
    def of_batch(cls, batch, token_usage: float, num_queue_reqs: int, **role) -> "DecodeStats":
        return cls(num_running_reqs=batch.batch_size, num_tokens=sum(batch.prefix_lens) + batch.batch_size,
                   token_usage=token_usage, num_queue_reqs=num_queue_reqs, **role)


class IterationStats:
    """The stats lines of one worker and the gauges they set."""

    def __init__(self, log_forward_iters: bool, decode_log_interval: int):
        self.log_forward_iters = log_forward_iters      # PDCLUSTER_LOG_FORWARD_ITERS: applied by the config loader
        self.decode_log_interval = max(1, decode_log_interval)
        self.forward_iter = 0                              # last reported
        self.gen_throughput: Optional[float] = None        # set by the first decode line
        self.reported_iters: list[tuple[str, int]] = []    # (kind, iteration), for tests and debugging
        self._last_prefill_log = self._last_decode_log = time.perf_counter()
        self._decode_tokens_since_log = 0
        self._num_decode_batches = 0

    def _label(self, kind: str, it: int) -> str:
        return f"{kind} batch [{it}]" if self.log_forward_iters else f"{kind} batch"

    def report_prefill(self, it: int, stats: PrefillStats) -> str:
        now = time.perf_counter()
        throughput = stats.num_new_tokens / max(now - self._last_prefill_log, 1e-9)
        self._last_prefill_log = now
        parts = [self._label("Prefill", it), f"#new-seq: {stats.num_new_seqs}",
                 f"#new-token: {stats.num_new_tokens}"]
        if stats.cached_len is not None:
            parts.append(f"#cached-token: {stats.cached_len}")
        if stats.num_prefix_tokens is not None:
            parts.append(f"#prefix-token: {stats.num_prefix_tokens}")
        parts += [f"token usage: {stats.token_usage:.2f}", f"#running-req: {stats.num_running_reqs}",
                  f"#queue-req: {stats.num_queue_reqs}"]
        if stats.num_bootstrap_reqs is not None:
            parts.append(f"#bootstrap-req: {stats.num_bootstrap_reqs}")
        if stats.num_inflight_reqs is not None:
            parts.append(f"#inflight-req: {stats.num_inflight_reqs}")
        parts.append(f"input throughput (token/s): {throughput:.2f}")
        line = ", ".join(parts)
        logger.info(line)
        self.keep_reported(("prefill", it))
        self.forward_iter = it
        return line

    def keep_reported(self, entry: tuple[str, int]) -> None:
        """The recent reported iterations only: a worker serving for weeks must not grow."""
        self.reported_iters.append(entry)
        if len(self.reported_iters) > MAX_REPORTED_ITERS:
            del self.reported_iters[:MAX_REPORTED_ITERS // 2]

    def report_decode(self, it: int, num_new_tokens: int, stats: DecodeStats) -> Optional[str]:
        """Counts every decode batch; logs the first one's line, then one every `decode_log_interval`."""
        self._num_decode_batches += 1
        self._decode_tokens_since_log += num_new_tokens
        self.forward_iter = it
        if (self._num_decode_batches - 1) % self.decode_log_interval != 0:
            return None
        now = time.perf_counter()
        self.gen_throughput = self._decode_tokens_since_log / max(now - self._last_decode_log, 1e-9)
        self._last_decode_log, self._decode_tokens_since_log = now, 0
        parts = [self._label("Decode", it), f"#running-req: {stats.num_running_reqs}",
                 f"#token: {stats.num_tokens}", f"token usage: {stats.token_usage:.2f}"]
        if stats.num_prealloc_reqs is not None:
            parts.append(f"#prealloc-req: {stats.num_prealloc_reqs}")
        if stats.num_transfer_reqs is not None:
            parts.append(f"#transfer-req: {stats.num_transfer_reqs}")
        if stats.num_retracted_reqs is not None:
            parts.append(f"#retracted-req: {stats.num_retracted_reqs}")
        parts += [f"gen throughput (token/s): {self.gen_throughput:.2f}", f"#queue-req: {stats.num_queue_reqs}"]
        line = ", ".join(parts)
        logger.info(line)
        self.keep_reported(("decode", it))
        return line

    def gauges(self) -> dict:
        out = {"forward_iter": self.forward_iter}
        if self.gen_throughput is not None:
            out["gen_throughput"] = self.gen_throughput
        return out


class KvTransferStats:
    """Bytes a worker sent (prefill) or received (decode), and transfer times where the
    whole transfer is seen: prefill, from sending a kv_batch to its kv_ack."""

    def __init__(self):
        self.bytes_total = 0
        self.seconds = Histogram("kv_transfer_seconds", KV_TRANSFER_BUCKETS)
        self.failures: dict[str, int] = {}   # reason -> count: kv_transfer_failures_total{reason}

    def count_failure(self, reason: KvFailure) -> None:
        key = KvFailure(reason).value
        self.failures[key] = self.failures.get(key, 0) + 1

    def gauges(self) -> dict:
        """Its counters as `WorkerGauges` fields (the time histogram is prefill's alone)."""
        return {"kv_transfer_bytes_total": self.bytes_total, "kv_transfer_failures_total": dict(self.failures)}

    def record(self, num_bytes: int, seconds: Optional[float] = None) -> None:
        self.bytes_total += num_bytes
        if seconds is not None:
            self.seconds.observe(seconds)
