"""SendBacklog: the I/O thread's sends that wait for a slow peer, per destination.

A send that would block (the peer's high-water mark) is kept in that destination's queue
and retried, oldest first, before anything newer to the same peer goes out, so one slow
peer neither holds back the others nor sees its messages reordered. Past MAX_BACKLOG
waiting messages for one destination, new ones are dropped and counted. Runs on the I/O
thread only (`SocketLoop` owns one).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable, Hashable

import zmq

logger = logging.getLogger(__name__)

MAX_BACKLOG = 10_000       # queued messages per destination before dropping


class SendBacklog:
    def __init__(self, name: str, send_frames: Callable[[Hashable, list], None],
                 forget: Callable[[Hashable], None]):
        """`send_frames(key, frames)` sends without blocking (zmq.Again: retry later, another
        ZMQError: drop); `forget(key)` is told a destination is gone."""
        self.name = name
        self._send_frames = send_frames
        self._forget = forget
        self._pending: dict[Hashable, deque] = {}
        self.num_send_errors = 0           # dropped sends (unknown peer, backlog overflow)

    def __bool__(self) -> bool:
        """Some send waits for a peer (the I/O thread polls faster meanwhile)."""
        return bool(self._pending)

    def flush(self, outbox: deque) -> None:
        """Retry waiting destinations first, in order; then send what `outbox` holds
        ((key, frames), or (key, None): the destination is gone; this thread alone pops it)."""
        for key in list(self._pending):
            pending = self._pending[key]
            while pending and self._try_send(key, pending[0]):
                pending.popleft()
            if not pending:
                del self._pending[key]
        while outbox:
            key, frames = outbox.popleft()
            if frames is None:
                self._pending.pop(key, None)
                self._forget(key)
            elif key in self._pending or not self._try_send(key, frames):
                self._queue_for_retry(key, frames)

    def _queue_for_retry(self, key: Hashable, frames: list) -> None:
        pending = self._pending.setdefault(key, deque())
        if len(pending) >= MAX_BACKLOG:
            self.num_send_errors += 1
            logger.warning("%s: backlog for %s is full; dropping a message", self.name, key)
            return
        pending.append(frames)

    def _try_send(self, key: Hashable, frames: list) -> bool:
        """True when the message left (or was dropped for good), False to retry later."""
        try:
            self._send_frames(key, frames)
        except zmq.Again:
            return False
        except zmq.ZMQError as e:
            self.num_send_errors += 1
            logger.warning("%s: dropped a message to %s: %s", self.name, key, e)
        return True
