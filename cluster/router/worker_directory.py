"""The worker directory: who is registered, alive, how loaded, and who gets the next request.

Policies (`router.policy`):
- `round_robin`: rotate over the alive workers of a role, independently per role.
- `least_load`: power of two choices - sample two candidates, take the one with the lower
  load = reported num_queue_reqs + num_running_reqs + the router's own in-flight count
  (the reported gauges lag by up to one heartbeat; the in-flight count does not).
- `cache_aware`: the worker whose cached prefix of the request is longest, by the
  router's own PrefixIndex of what it dispatched; least load when nothing matches or when
  the candidates' loads differ by more than BALANCE_THRESHOLD (a hot prefix must not
  pin every request on one worker). Each choice is logged.
A (prefill, decode) pair must have equal KV fingerprints when both reported one.
Not thread-safe by itself: the dispatcher holds its lock around every call.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cluster.router.prefix_index import PrefixIndex

log = logging.getLogger("pdcluster.router")
BALANCE_THRESHOLD = 4    # cache_aware: load spread (requests) beyond which least load wins

from cluster.wire.messages import Peer, WorkerGauges


@dataclass
class WorkerInfo:
    worker_id: str
    role: str
    model: str
    capacity: dict
    kv_fingerprint: dict
    data_addr: str
    pid: int
    last_seen: float = field(default_factory=time.monotonic)
    gauges: WorkerGauges = field(default_factory=WorkerGauges)   # as last reported
    forward_ct: int = 0
    num_inflight: int = 0                     # router-side: requests assigned and not done
    num_dispatched_tokens: int = 0            # router-side: prompt tokens placed here since its last heartbeat
    stale_rids: set = field(default_factory=set)  # wire rids it held when declared dead
    switching_to: Optional[str] = None        # a role switch under way: nothing new placed here
    switch_started: float = 0.0

    @property
    def load(self) -> float:
        reported = (self.gauges.num_queue_reqs or 0) + (self.gauges.num_running_reqs or 0)
        return float(reported) + self.num_inflight

    @property
    def peer(self) -> Peer:
        return Peer(self.worker_id, self.data_addr)

    def describe(self, now: float) -> dict:
        return {"worker_id": self.worker_id, "role": self.role, "model": self.model,
                "pid": self.pid, "data_addr": self.data_addr,
                "seconds_since_heartbeat": round(now - self.last_seen, 3),
                "num_inflight": self.num_inflight, "forward_ct": self.forward_ct,
                "switching_to": self.switching_to}


class WorkerDirectory:
    def __init__(self, policy: str, rng: Optional[random.Random] = None):
        self.policy = policy
        self.workers: dict[str, WorkerInfo] = {}
        self.departed: dict[str, WorkerInfo] = {}  # declared dead; revived by a heartbeat
        self._rr: dict[str, int] = {}
        self._rng = rng or random.Random()
        self.prefixes = PrefixIndex()              # cache_aware: what each worker likely holds

    # membership
    def add(self, info: WorkerInfo) -> Optional[WorkerInfo]:
        """Register (or re-register) a worker; returns the entry it replaces, if any."""
        self.departed.pop(info.worker_id, None)
        old = self.workers.get(info.worker_id)
        self.workers[info.worker_id] = info
        self.prefixes.add_worker(info.worker_id, int(info.capacity.get("page_size", 16)),
                                 int(info.capacity.get("num_pages", 0)))
        return old

    def remove(self, worker_id: str) -> Optional[WorkerInfo]:
        info = self.workers.pop(worker_id, None)
        self.prefixes.remove_worker(worker_id)
        if info is not None:
            info.num_inflight = 0
            self.departed[worker_id] = info
        return info

    def revive(self, worker_id: str) -> Optional[WorkerInfo]:
        info = self.departed.pop(worker_id, None)
        if info is not None:
            info.last_seen = time.monotonic()
            self.workers[worker_id] = info
        return info

    def get(self, worker_id: str) -> Optional[WorkerInfo]:
        return self.workers.get(worker_id)

    def excuse(self, seconds: float) -> None:
        """The judge itself was not running for `seconds`: heartbeats may be unread."""
        for w in self.workers.values():
            w.last_seen += seconds

    def silent_since(self, deadline: float) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.last_seen < deadline]

    def of_role(self, role: str, model: Optional[str] = None) -> list[WorkerInfo]:
        return sorted((w for w in self.workers.values() if w.role == role and w.switching_to is None
                       and (model is None or w.model == model)),
                      key=lambda w: w.worker_id)

    def count(self, role: str) -> int:
        return len(self.of_role(role))

    def dllm_models(self) -> list[str]:
        return sorted({w.model for w in self.workers.values() if w.role == "dllm"})

    # dispatch
    def can_serve_main(self) -> bool:
        return self.has_pair() or self.count("unified") > 0

    def has_pair(self) -> bool:
        return self.count("prefill") > 0 and self.count("decode") > 0

    def pick(self, role: str, model: Optional[str] = None,
             exclude: frozenset = frozenset(), fingerprint: Optional[dict] = None,
             token_ids: Optional[Sequence[int]] = None, rid: str = "") -> Optional[WorkerInfo]:
        candidates = [w for w in self.of_role(role, model) if w.worker_id not in exclude
                      and _compatible(fingerprint, w.kv_fingerprint)]
        if not candidates:
            return None
        if self.policy == "cache_aware" and token_ids is not None:
            return self._pick_cached(role, candidates, token_ids, rid)
        if self.policy in ("least_load", "cache_aware"):
            if len(candidates) == 1:
                return candidates[0]
            a, b = self._rng.sample(candidates, 2)
            return a if a.load <= b.load else b
        k = self._rr.get(role, 0)
        self._rr[role] = k + 1
        return candidates[k % len(candidates)]

    def _pick_cached(self, role: str, candidates: list[WorkerInfo], token_ids: Sequence[int],
                     rid: str) -> WorkerInfo:
        matched = {w.worker_id: self.prefixes.match(w.worker_id, token_ids) for w in candidates}
        loads = [w.load for w in candidates]
        least = min(candidates, key=lambda w: w.load)
        if max(loads) - min(loads) > BALANCE_THRESHOLD:
            chosen, why = least, f"imbalanced loads {min(loads):g}..{max(loads):g}, least load"
        else:
            best = max(candidates, key=lambda w: (matched[w.worker_id], -w.load))
            chosen, why = (best, "longest cached prefix") if matched[best.worker_id] else (least, "no cached prefix, least load")
        if role != "decode":   # decode caches a request's KV when it finishes (record_finished)
            self.prefixes.insert(chosen.worker_id, token_ids)
        log.info("cache_aware: %s %s -> %s (%s; cached %d/%d tokens; %s)", role, rid or "-", chosen.worker_id,
                 why, matched[chosen.worker_id], len(token_ids),
                 ", ".join(f"{w}={n}" for w, n in matched.items()))
        return chosen

    def pick_pair(self, exclude: frozenset = frozenset(), token_ids: Optional[Sequence[int]] = None,
                  rid: str = "") -> Optional[tuple[WorkerInfo, WorkerInfo]]:
        prefill = self.pick("prefill", exclude=exclude, token_ids=token_ids, rid=rid)
        if prefill is None:
            return None
        decode = self.pick("decode", exclude=exclude, fingerprint=prefill.kv_fingerprint,
                           token_ids=token_ids, rid=rid)
        return (prefill, decode) if decode is not None else None

    def record_finished(self, worker_id: str, token_ids: Sequence[int]) -> None:
        """A worker that keeps finished requests' KV (decode, unified) now holds all of it."""
        self.prefixes.insert(worker_id, token_ids)


def _compatible(want: Optional[dict], have: dict) -> bool:
    return not want or not have or want == have
