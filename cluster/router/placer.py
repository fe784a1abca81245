"""Placer: which workers serve a request's next attempt. A DLLM request goes to a dllm
worker, paired with a prefill worker when its group prefills remotely; without a (prefill,
decode) pair, to a unified worker; otherwise to a decode worker that already holds nearly
all of the prompt (selective disaggregation, prefilled there) or to a pair the directory's
policy picks."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping

from cluster.router.request_state import Placement, RequestState
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo

if TYPE_CHECKING:
    from cluster.config_types import WorkerGroup

log = logging.getLogger("pdcluster.router")


class Placer:
    def __init__(self, directory: WorkerDirectory, local_prefill_max_tokens: int,
                 dllm_groups: Mapping[str, "WorkerGroup"] = {}):
        """`dllm_groups`: the [[dllm]] group serving each DLLM model name (its `prefill` choice)."""
        self.directory = directory
        self.local_prefill_max_tokens = local_prefill_max_tokens
        self.dllm_groups = dict(dllm_groups)

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
            local = self.local_prefill(st, ids)
            if local is not None:
                st.placement = Placement.single("local", local.worker_id)
            elif pair := d.pick_pair(token_ids=ids, rid=st.rid):
                st.placement = Placement("pd", pair[0].worker_id, pair[1].worker_id)
        return st.placement is not None

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
