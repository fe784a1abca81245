"""A Scheduler whose batches come from a script, for testing the loops themselves.

The model step is a real sleep (it releases the GIL like a torch forward does), so
overlap can be observed with timestamps.
"""
from __future__ import annotations

import time
from typing import Optional

from cluster.config import SchedulerConfig
from cluster.runtime.stats import DecodeStats, PrefillStats
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
from cluster.runtime.base_scheduler import Scheduler


class ScriptedScheduler(Scheduler):
    """`script` is a list of 'prefill' | 'decode' | 'idle', one entry per loop pass."""

    role = "scripted"

    def __init__(self, script: list[str], overlap: bool, forward_s: float = 0.0,
                 process_s: float = 0.0, log_forward_iters: bool = True):
        cfg = SchedulerConfig(overlap=overlap, log_forward_iters=log_forward_iters, decode_log_interval=1)
        super().__init__(cfg, "scripted-0", self._forward)
        self.script = list(script)
        self.forward_s, self.process_s = forward_s, process_s
        self.launched: list[int] = []                 # forward_iter of each launch, in order
        self.processed: list[tuple[str, int]] = []    # (mode, forward_iter) in processing order
        self.lines: list[str] = []
        self._n = 0

    def recv_requests(self) -> None:
        pass

    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        if not self.script:
            self.is_running = False
            return None
        kind = self.script.pop(0)
        if kind == "idle":
            return None
        self._n += 1
        req = Req(f"r{self._n}", [1, 2, 3], SamplingParams())
        mode = ForwardMode.EXTEND if kind == "prefill" else ForwardMode.DECODE
        return ScheduleBatch([req], mode, extend_lens=[3 if kind == "prefill" else 1])

    def build_forward_input(self, batch: ScheduleBatch):
        self.launched.append(batch.forward_iter)
        return batch.forward_iter

    def _forward(self, forward_iter: int) -> int:
        if self.forward_s:
            time.sleep(self.forward_s)
        return forward_iter

    def on_idle(self) -> None:
        pass

    def process_batch_result(self, batch: ScheduleBatch, result: int) -> None:
        assert result == batch.forward_iter, "result processed with the wrong batch"
        if self.process_s:
            time.sleep(self.process_s)
        self.processed.append((batch.mode.value, batch.forward_iter))
        if batch.mode == ForwardMode.EXTEND:
            line = self.report_prefill_stats(batch, PrefillStats(1, batch.num_tokens))
        else:
            line = self.report_decode_stats(batch, DecodeStats(1, 4))
        self.lines.append(line)

    def run(self) -> "ScriptedScheduler":
        self.event_loop()
        return self
