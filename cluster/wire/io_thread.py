"""SocketLoop: ZeroMQ sockets owned by one I/O thread, fed and drained through queues.

ZeroMQ sockets are not thread-safe, so each transport object owns one thread that does
all the socket work: it sends what callers put in the outbox and decodes what arrives
into the inbox (or hands it to an `on_message` callback). A scheduler therefore never
blocks on the network: `send` only encodes and enqueues, `recv` reads a queue.

- Wakeup: callers ping an inproc PUSH/PULL pair after enqueueing (under a lock: the PUSH
  end is shared), so sends leave at once instead of at the next poll tick.
- Back-pressure: a send that would block (peer's high-water mark) goes to a per-destination
  backlog (`send_backlog.py`) retried every few ms, so one slow peer does not hold back the others.
- Back-pressure on receive: past MAX_INBOX undelivered items the thread stops reading,
  so ZeroMQ's receive high-water mark pushes back on the senders instead of memory growing.
- Bad frames: `ProtocolError` is logged (rate limited), counted in `num_protocol_errors`
  and dropped; the socket keeps working. No frame over MAX_FRAME_BYTES is even received.
- CURVE (`curve.py`): with keys, bound sockets are CURVE servers whose ZAP requests this
  thread answers, and refused handshakes are counted in `rejected_frames` by reason.
- Shutdown: `close()` sets a flag and wakes the thread, which closes its sockets with
  linger 0; then the context is terminated, so the port is free when close() returns.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Hashable, Optional

import zmq

from cluster.wire.curve import HANDSHAKE_FAILURES, ZAP_ENDPOINT, CurveKeys
from cluster.wire.protocol import MAX_HEADER_BYTES, Message, ProtocolError, encode
from cluster.wire.send_backlog import SendBacklog

logger = logging.getLogger(__name__)

POLL_MS = 100              # idle poll tick (the stop flag is seen within this)
BACKLOG_POLL_MS = 5        # poll tick while some send waits for a peer
RECV_BURST = 256           # messages read per socket per pass (a callback's sends leave after it)
CLOSE_TIMEOUT_S = 2.0
MAX_INBOX = 4096           # undelivered received items before reading pauses
MAX_FRAME_BYTES = MAX_HEADER_BYTES + (1 << 20)
_ids = itertools.count()
# NOTE: plain ints: zmq's enum members make every `getsockopt(EVENTS) & POLLIN` build a Flag
# (enum machinery, ~2 us each, run cold once per message on the socket threads)
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class SocketLoop:
    """Base of the transports; subclasses create sockets and say how frames map to items."""

    def __init__(self, name: str, on_message: Optional[Callable[[Any], None]] = None,
                 curve: Optional[CurveKeys] = None, arrivals: Optional[threading.Event] = None):
        self.name = name
        self.curve = curve
        self.rejected_frames: dict[str, int] = {}    # reason -> refused handshakes / frames
        self._zap: Optional[zmq.Socket] = None       # ZAP handler (CURVE servers only)
        self._monitors: list[zmq.Socket] = []
        self.num_protocol_errors = 0
        self._on_message = on_message
        self.arrivals = arrivals           # set on every inbox item (a waiter's wake-up), often shared
        self._ctx = zmq.Context(io_threads=1)
        self._inbox: queue.Queue = queue.Queue()
        # (destination key, frames | None); a deque: appends and pops are atomic, and the I/O thread,
        # its only reader, checks it empty without a lock or a raised queue.Empty per wake-up
        self._outbox: deque = deque()
        self._backlog = SendBacklog(name, self._send_frames, self._forget)
        self._closed = threading.Event()
        self._close_lock = threading.Lock()
        self._wake_lock = threading.Lock()
        addr = f"inproc://wake-{next(_ids)}"
        self._wake_rx = self._socket(zmq.PULL)
        self._wake_rx.bind(addr)
        self._wake_tx = self._ctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(addr)
        self._thread = threading.Thread(target=self._run, name=f"io-{name}", daemon=True)

    # subclass hooks ----------------------------------------------------------------
    def _recv_sockets(self) -> list[zmq.Socket]:
        raise NotImplementedError

    def _parse(self, sock: zmq.Socket, frames: list) -> Any:
        """Frames of one received message -> inbox item; raise ProtocolError if bad."""
        raise NotImplementedError

    def _send_frames(self, key: Hashable, frames: list) -> None:
        """Send without blocking; raise zmq.Again to retry later, ZMQError to drop."""
        raise NotImplementedError

    def _forget(self, key: Hashable) -> None:
        """A destination is gone (see `_enqueue(key, None)`)."""

    def _close_sockets(self) -> None:
        """Close sockets other than the recv sockets (runs on the I/O thread)."""

    # caller side -------------------------------------------------------------------
    def _socket(self, kind: int) -> zmq.Socket:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        return sock

    def _serve_securely(self, sock: zmq.Socket) -> None:
        """A socket about to bind: CURVE server (when keyed) and a monitor of refusals."""
        if self.curve is None:
            return
        self.curve.serve(sock)
        if self._zap is None:
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(ZAP_ENDPOINT)
        self._watch(sock, sum(HANDSHAKE_FAILURES))

    def _watch(self, sock: zmq.Socket, events: int) -> None:
        """Deliver `sock`'s monitor events to `_on_socket_event` (on the I/O thread)."""
        self._monitors.append(sock.get_monitor_socket(events))

    def _on_socket_event(self, event: int) -> None:
        """A monitored socket event (subclasses track connectivity)."""

    def _dial_securely(self, sock: zmq.Socket) -> None:
        if self.curve is not None:
            self.curve.dial(sock)

    @property
    def num_send_errors(self) -> int:
        """Dropped sends (unknown peer, backlog overflow)."""
        return self._backlog.num_send_errors

    def count_rejected(self, reason: str) -> None:
        self.rejected_frames[reason] = self.rejected_frames.get(reason, 0) + 1

    def _enqueue(self, key: Hashable, msg: Optional[Message]) -> None:
        if self._closed.is_set():
            raise RuntimeError(f"{self.name}: send after close()")
        self._outbox.append((key, None if msg is None else encode(msg)))
        with self._wake_lock:
            if not self._closed.is_set():
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass                       # the thread has wakeups pending already

    def _get(self, timeout: Optional[float]) -> Any:
        """Next inbox item, or None after `timeout` seconds (None = until close())."""
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        while True:
            left = POLL_MS / 1000 if end is None else min(POLL_MS / 1000, end - time.monotonic())
            try:
                return self._inbox.get(timeout=max(0.0, left))
            except queue.Empty:
                if self._closed.is_set() or (end is not None and time.monotonic() >= end):
                    return None

    def close(self) -> None:
        """Stop the I/O thread and release sockets and ports; idempotent, bounded wait."""
        with self._close_lock:
            if self._closed.is_set():
                return
            with self._wake_lock:
                self._closed.set()
                try:
                    self._wake_tx.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self._wake_tx.close(linger=0)
            self._thread.join(CLOSE_TIMEOUT_S)
            if self._thread.is_alive():
                logger.error("%s: I/O thread did not stop in %.1fs; leaving its context",
                             self.name, CLOSE_TIMEOUT_S)
                return
            self._ctx.term()

    def _abandon(self, *socks: zmq.Socket) -> None:
        """A constructor failed before the I/O thread started: free what it created."""
        self._closed.set()
        for sock in (*socks, self._wake_rx, self._wake_tx):
            sock.close(linger=0)
        self._ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # I/O thread --------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in [self._wake_rx, self._zap, *self._monitors, *self._recv_sockets()]:
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        is_reading = True
        try:
            while not self._closed.is_set():
                has_room = self._on_message is not None or self._inbox.qsize() < MAX_INBOX
                if has_room != is_reading:         # NOTE: back-pressure: stop reading
                    is_reading = has_room
                    for sock in self._recv_sockets():
                        poller.modify(sock, zmq.POLLIN if has_room else 0)
                busy = self._backlog or not has_room
                events = dict(poller.poll(BACKLOG_POLL_MS if busy else POLL_MS))
                if self._wake_rx in events:
                    while self._wake_rx.getsockopt(EVENTS) & POLLIN:
                        self._wake_rx.recv()
                if self._zap in events:
                    self.curve.answer_zap(self._zap)
                for mon in self._monitors:
                    if mon in events:
                        self._read_monitor(mon)
                self._backlog.flush(self._outbox)
                for sock in self._recv_sockets():
                    if sock in events:
                        self._drain(sock)
        except Exception:                      # a bug here must not hang callers silently
            logger.exception("%s: I/O thread failed", self.name)
        finally:
            self._close_all()

    def _read_monitor(self, mon: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message
        while mon.poll(0):
            event = recv_monitor_message(mon)
            self._on_socket_event(event["event"])
            reason = HANDSHAKE_FAILURES.get(event["event"])
            if reason is not None:
                self.count_rejected(reason)
                n = sum(self.rejected_frames.values())
                if n <= 10 or n % 1000 == 0:
                    logger.warning("%s: refused a connection from %s (%s; %d so far)",
                                   self.name, event.get("endpoint"), reason, n)

    def _close_all(self) -> None:
        for sock in [self._zap, *self._monitors]:
            if sock is not None:
                sock.close(linger=0)
        self._close_sockets()
        for sock in self._recv_sockets():
            sock.close(linger=0)
        self._wake_rx.close(linger=0)

    def _drain(self, sock: zmq.Socket) -> None:
        # NOTE: asks the socket before each read instead of reading until zmq.Again: at one stream
        # every wake-up reads one message, and the raised Again cost as much as the read (cold)
        for _ in range(RECV_BURST):
            if not sock.getsockopt(EVENTS) & POLLIN:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                item = self._parse(sock, frames)
            except ProtocolError as e:
                self.num_protocol_errors += 1
                n = self.num_protocol_errors
                if n <= 10 or n % 1000 == 0:
                    logger.warning("%s: dropped bad message (%d so far): %s", self.name, n, e)
                continue
            if self._on_message is None:
                self._inbox.put(item)
                if self.arrivals is not None:
                    self.arrivals.set()
                continue
            try:
                self._on_message(item)
            except Exception:
                logger.exception("%s: on_message callback failed", self.name)
            if self._outbox:   # NOTE: what the callback sent leaves now, not after the whole burst
                self._backlog.flush(self._outbox)
