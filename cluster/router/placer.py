"""Placer: which workers serve a request's next attempt. A DLLM request goes to a dllm
worker, paired with a prefill worker when its group prefills remotely; without a (prefill,
decode) pair, to a unified worker; otherwise to a decode worker that prefills the prompt
itself (decode-side prefill) or to a pair the directory's policy picks.

Decode-side prefill has two triggers:
- selective disaggregation: a decode worker already holds all but at most
  `router.local_prefill_max_tokens` of the prompt;
- the `[slo] ttft` target: every prefill worker's predicted queueing would break it, and a
  decode worker with headroom would be done sooner. A prefill worker's prediction is its queued
  tokens plus this prompt over its measured rate (`num_queue_tokens`, `prefill_throughput`); a
  decode worker's is the same over the rate it can prefill beside its running batch within the
  TPOT target (`decode_side_prefill_rate`, from its step cost model). The gauges lag by up to a
  heartbeat, so the tokens placed on a worker since its last one count too. Without a measured
  rate a prefill worker is taken to be on time: no evidence, no detour. A decode worker that
  never prefilled is rated by its cost model's conservative prior alone, so while the prefill
  side would break the target it gets one prompt per heartbeat as a probe until it has measured.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Mapping, Optional

from cluster.router.request_state import Placement, RequestState
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo

if TYPE_CHECKING:
    from cluster.config_types import WorkerGroup

log = logging.getLogger("pdcluster.router")
MAX_TOKEN_USAGE = 0.9     # a decode worker fuller than this has no room to prefill


def queued_tokens(w: WorkerInfo) -> int:
    return (w.gauges.num_queue_tokens or 0) + w.num_dispatched_tokens


def prefill_seconds(w: WorkerInfo, num_tokens: int) -> float:
    """Predicted seconds until prefill worker `w` has prefilled `num_tokens` more after its queue."""
    rate = w.gauges.prefill_throughput
    return (queued_tokens(w) + num_tokens) / rate if rate else 0.0


def decode_side_seconds(w: WorkerInfo, num_tokens: int) -> float:
    """The same for decode worker `w` prefilling beside its running batch; inf without headroom."""
    rate = w.gauges.decode_side_prefill_rate
    if not rate or (w.gauges.token_usage or 0.0) >= MAX_TOKEN_USAGE:
        return math.inf
    return (queued_tokens(w) + num_tokens) / rate


class Placer:
    def __init__(self, directory: WorkerDirectory, local_prefill_max_tokens: int,
                 dllm_groups: Mapping[str, "WorkerGroup"] = {}, ttft: Optional[float] = None):
        """`dllm_groups`: the [[dllm]] group serving each DLLM model name (its `prefill` choice);
        `ttft`: the [slo] target a prompt goes to decode-side prefill to keep."""
        self.directory = directory
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.dllm_groups = dict(dllm_groups)
        self.ttft = ttft

    def place(self, st: RequestState) -> bool:
        """Set `st.placement` to a new choice of workers; False (placement None) when none serves it."""
        d = self.directory
        st.placement = None
        if st.route == "dllm":
            w = d.pick("dllm", model=st.model)
            prefill = self.remote_prefill(st, w) if w else None
            if prefill:
                st.placement = Placement("dllm_remote", prefill.worker_id, w.worker_id)
            elif w:
                st.placement = Placement.single("dllm", w.worker_id)
        elif d.count("unified") and not d.has_pair():
            w = d.pick("unified", token_ids=st.input_ids + st.output_ids, rid=st.rid)
            if w:
                st.placement = Placement.single("unified", w.worker_id)
        else:
            ids = st.input_ids + st.output_ids
            local = self.local_prefill(st, ids) or self.decode_side(st, ids)
            if local is not None:
                st.placement = Placement.single("local", local.worker_id)
                local.num_dispatched_tokens += self.uncached(local, ids)
            elif pair := d.pick_pair(token_ids=ids, rid=st.rid):
                st.placement = Placement("pd", pair[0].worker_id, pair[1].worker_id)
                pair[0].num_dispatched_tokens += self.uncached(pair[0], ids)
        return st.placement is not None

    def uncached(self, w: WorkerInfo, ids: list[int]) -> int:
        return len(ids) - self.directory.prefixes.match(w.worker_id, ids)

    def decode_side(self, st: RequestState, ids: list[int]) -> Optional[WorkerInfo]:
        """The decode worker that prefills this prompt itself because the prefill side would
        break the TTFT target and it would be done sooner; None otherwise (or without a target)."""
        if self.ttft is None:
            return None
        d = self.directory
        prefill_s = min((prefill_seconds(w, self.uncached(w, ids)) for w in d.of_role("prefill")), default=math.inf)
        if prefill_s <= self.ttft:
            return None
        choices = [(decode_side_seconds(w, self.uncached(w, ids)), w.worker_id, w) for w in d.of_role("decode")]
        seconds, _, w = min(choices, default=(math.inf, "", None))
        why = "sooner"
        if w is not None and seconds >= prefill_s:
            # a worker that never prefilled is rated by its prior alone, slow on purpose: one probe
            # (per heartbeat) measures it, or it would never be chosen to be measured
            untried = [c for c in choices if math.isfinite(c[0]) and c[2].num_dispatched_tokens == 0
                       and not c[2].gauges.decode_side_prefill_tokens_total]
            seconds, _, w = min(untried, default=(math.inf, "", None))
            why = "a probe: it never prefilled"
        if w is None and not d.count("prefill"):
            w = self.only_decode_left(choices)
            why = "no prefill worker is alive"
        if w is None:
            return None
        log.info("decode-side prefill: request %s on %s (%d uncached tokens, predicted %.3f s, %s; prefill side "
                 "%.3f s > ttft %g s)", st.rid, w.worker_id, self.uncached(w, ids), seconds, why, prefill_s, self.ttft)
        return w

    @staticmethod
    def only_decode_left(choices: list) -> Optional[WorkerInfo]:
        """With no prefill worker alive a decode worker with pages to spare prefills, measured or
        not (one that has not yet run a forward reports no rate): /health calls this cluster
        degraded, not down, so a request must not be refused while one has room."""
        room = [c for c in choices if (c[2].gauges.token_usage or 0.0) < MAX_TOKEN_USAGE]
        return min(room, key=lambda c: (c[0], c[2].load, c[1]), default=(0, "", None))[2]

    def local_prefill(self, st: RequestState, ids: list[int]) -> WorkerInfo | None:
        """Selective disaggregation: the decode worker that already holds all but at most
        `router.local_prefill_max_tokens` of the prompt prefills the rest itself (no prefill
        worker, no KV transfer); None when no decode worker does."""
        limit = self.local_prefill_max_tokens
        if limit <= 0:
            return None
        d = self.directory
        uncached = {w.worker_id: len(ids) - d.prefixes.match(w.worker_id, ids) for w in d.of_role("decode")}
        fits = [w for w in d.of_role("decode") if uncached[w.worker_id] <= limit]
        if not fits:
            return None
        w = min(fits, key=lambda w: (uncached[w.worker_id], w.load))
        log.info("local prefill: request %s on %s (uncached %d of %d tokens <= %d)", st.rid, w.worker_id,
                 uncached[w.worker_id], len(ids), limit)
        return w

    def remote_prefill(self, st: RequestState, dllm: WorkerInfo) -> WorkerInfo | None:
        """The prefill worker that prefills a DLLM request for `dllm`, or None when the worker
        prefills it itself: its group says `local`; `auto` with a prompt shorter than
        `remote_prefill_min_tokens` while `dllm` is idle (a busy worker's running blocks would
        wait for the prompt's forward); or no compatible prefill worker is alive (a DLLM
        request never waits for one)."""
        group = self.dllm_groups.get(st.model)
        if group is None or group.prefill == "local" or not dllm.data_addr:
            return None
        num_tokens = len(st.input_ids) + len(st.output_ids)
        if group.prefill == "auto" and num_tokens < group.remote_prefill_min_tokens and dllm.load == 0:
            return None
        return self.directory.pick("prefill", fingerprint=dllm.kv_fingerprint,
                                   token_ids=st.input_ids + st.output_ids, rid=st.rid)
