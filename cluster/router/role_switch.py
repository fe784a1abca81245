"""In-place role switches: a worker turns prefill <-> decode (or unified <-> either) on the
model it already loaded.

`begin` (under the dispatcher's lock) refuses a switch that would leave the cluster unable to
serve its model, marks the worker `switching_to` (the directory places nothing new on it from
then on) and sends `role_switch`; whatever was sent before drains on the worker, which then
registers again, same process, with the new role. `finish` recognises that `register`: the
worker's requests were drained, not lost, so it is no restart. Counted as
`pdcluster:role_switches_total{from,to}`.
"""
from __future__ import annotations

import logging
import time
from typing import Iterable, Optional

from prometheus_client.core import CounterMetricFamily

from cluster.roles import SWITCHABLE_ROLES
from cluster.router.errors import APIError, bad_request
from cluster.router.metrics import PREFIX
from cluster.router.worker_directory import WorkerDirectory, WorkerInfo
from cluster.wire import protocol

log = logging.getLogger("pdcluster.router")


class RoleSwitches:
    def __init__(self, directory: WorkerDirectory, send):
        self.directory, self.send = directory, send
        self.counts: dict[tuple[str, str], int] = {}

    def begin(self, worker_id: str, role: str) -> WorkerInfo:
        """Start switching `worker_id` to `role`; APIError (400/404/409) when it may not."""
        if role not in SWITCHABLE_ROLES:
            raise bad_request(f"role must be one of {', '.join(SWITCHABLE_ROLES)}, got {role!r}")
        info = self.directory.get(worker_id)
        if info is None:
            raise APIError(404, f"no live worker {worker_id!r}", "not_found_error")
        if info.role not in SWITCHABLE_ROLES:
            raise APIError(409, f"a {info.role} worker cannot switch roles", "conflict")
        if info.switching_to is not None:
            raise APIError(409, f"{worker_id} is already switching to {info.switching_to}", "conflict")
        if info.role == role:
            raise APIError(409, f"{worker_id} is already a {role} worker", "conflict")
        roles = [role if w is info else w.role for w in self.directory.workers.values()
                 if w.switching_to is None and w.model == info.model]
        if not (("prefill" in roles and "decode" in roles) or "unified" in roles):
            raise APIError(409, f"switching {worker_id} to {role} would leave no prefill/decode pair "
                           "and no unified worker", "conflict")
        info.switching_to, info.switch_started = role, time.monotonic()
        self.send(worker_id, protocol.RoleSwitch(role=role))
        log.info("role switch: %s %s -> %s requested", worker_id, info.role, role)
        return info

    def finish(self, old: Optional[WorkerInfo], msg) -> bool:
        """Is this `register` the end of `old`'s switch (same process, the role it was asked)?"""
        if old is None or old.switching_to != msg.role or old.pid != msg.pid:
            return False
        key = (old.role, msg.role)
        self.counts[key] = self.counts.get(key, 0) + 1
        log.info("role switch: %s %s -> %s done in %.2f s", msg.worker_id, old.role, msg.role,
                 time.monotonic() - old.switch_started)
        return True

    def collect(self) -> Iterable:
        family = CounterMetricFamily(PREFIX + "role_switches", "Workers that switched role in "
                                     "place (drained, registered again with the new role).",
                                     labels=["from", "to"])
        for (src, dst), n in sorted(self.counts.items()):
            family.add_metric([src, dst], n)
        yield family
