"""The colocated worker: prefill and decode in one process, no KV handoff.

The setup a small deployment uses and the baseline disaggregation is measured against.
Run: `python -m cluster.unified --config C --worker-id unified-0 --router EP`.
"""
from __future__ import annotations

import sys
from typing import Optional

from cluster.roles import served_model
from cluster.runtime.decode_manager import DecodeManager
from cluster.runtime.prefill_manager import PrefillManager
from cluster.runtime.schedule_batch import Req, ScheduleBatch
from cluster.runtime.worker_scheduler import WorkerScheduler


class UnifiedScheduler(WorkerScheduler):
    role = "unified"
    supports_prefix_cache = True
    supports_deferred_reads = True

    def __init__(self, config, worker_id, runner, control):
        super().__init__(config, worker_id, runner, control)
        self.prefill = PrefillManager(self.cache, config.max_prefill_tokens, config.max_running_requests)
        self.decode = DecodeManager(self.cache, on_retract=self.retract, on_fail=self.fail)

    def admit(self, req: Req, msg) -> None:
        self.prefill.add(req)

    def retract(self, req: Req) -> None:
        self.prefill.add(req, front=True)   # re-prefilled with its tokens so far

    def forget(self, req: Req) -> None:
        self.prefill.remove(req.rid)
        self.decode.remove(req)

    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        return self.decode.schedule_after(self.prefill)

    @property
    def num_running_reqs(self) -> int:
        return len(self.decode)

    @property
    def num_queue_reqs(self) -> int:
        return len(self.prefill)


def build(args, config, group, runner, control):
    return UnifiedScheduler(group.scheduler, args.worker_id, runner, control), {"model": served_model(config, group)}


def main(argv=None) -> int:
    from cluster.runtime.worker_main import run_worker
    return run_worker("unified", argv, build)


if __name__ == "__main__":
    sys.exit(main())
