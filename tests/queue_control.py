"""An in-process stand-in for the router end of a worker's control socket.

Drives a real scheduler with a real model in one process: `generate()` queues a
request like the router would, `tokens()` collects what the worker streamed back.
"""
from __future__ import annotations

import queue
from typing import Optional

from cluster.wire import protocol as P
from cluster.sampling_params import SamplingParams


class QueueControl:
    """A `ControlPlane` (runtime/worker_scheduler.py) that the test drives."""
    arrivals = None                      # no wake-up event: an idle worker polls `recv`
    num_protocol_errors = 0

    def __init__(self):
        self.rejected_frames: dict[str, int] = {}
        self.inbound: queue.Queue = queue.Queue()
        self.sent: list = []
        self.num_finished = 0                # counted as they arrive: a poll need not rescan `sent`
        self.num_errors = 0

    def send(self, msg) -> None:
        self.sent.append(msg)
        if isinstance(msg, P.Tokens):
            self.num_finished += sum(1 for item in msg.items if item.finish_reason)   # plain ones never finish
        elif isinstance(msg, P.Error):
            self.num_errors += 1

    def recv(self, timeout: Optional[float] = None):
        try:
            return self.inbound.get(timeout=timeout) if timeout else self.inbound.get_nowait()
        except queue.Empty:
            return None

    def generate(self, rid: str, input_ids: list[int], **sampling) -> None:
        self.inbound.put(P.Generate(rid=rid, input_ids=list(input_ids),
                                    sampling=SamplingParams(**sampling)))

    def outputs(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for msg in self.sent:
            if isinstance(msg, P.Tokens):
                for item in msg.all_items():
                    out.setdefault(item.rid, []).extend(item.token_ids)
        return out

    def finished(self) -> dict[str, str]:
        return {item.rid: item.finish_reason for msg in self.sent if isinstance(msg, P.Tokens)
                for item in msg.all_items() if item.finish_reason}

    def errors(self) -> list:
        return [m for m in self.sent if isinstance(m, P.Error)]
