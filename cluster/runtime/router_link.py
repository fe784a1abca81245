"""A worker's link to its router: register again after a reconnect, give up after a while.

A router that restarts (or a link that drops and comes back) knows nothing of the workers
that were started by hand: each one sends its `register` again as soon as its control
socket completes a new handshake. A worker that cannot reach any router for
`timeouts.router_lost` seconds stops, rather than holding memory and ports for a cluster
that is gone (the launcher's workers die with their launcher anyway).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

logger = logging.getLogger("pdcluster.worker")
CHECK_S = 0.25


class RouterLink:
    def __init__(self, control, register, lost_after: float, on_lost: Callable[[], None]):
        self.control, self.register = control, register
        self.lost_after, self.on_lost = lost_after, on_lost
        self.is_lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-link", daemon=True)

    def start(self) -> "RouterLink":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        registered_at = 1           # the first `register` was queued before the first handshake
        while not self._stop.wait(CHECK_S):
            if self.control.num_connects > registered_at:
                registered_at = self.control.num_connects
                logger.warning("reconnected to the router: registering again")
                self.control.send(self.register)
            lost = self.control.lost_since
            if lost is not None and time.monotonic() - lost > self.lost_after:
                logger.error("no router for %.0f s (timeouts.router_lost): stopping",
                             time.monotonic() - lost)
                self.is_lost = True
                self.on_lost()
                return
