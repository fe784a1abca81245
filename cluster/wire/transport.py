"""ZeroMQ transports: the control plane (router <-> workers) and the data plane (worker <-> worker).

    ControlServer(endpoint)              router: ROUTER bound at `endpoint`
    ControlClient(endpoint, worker_id)   worker: DEALER (identity = worker_id) connected to it
    DataPlane(worker_id, bind_host)      prefill/decode: ROUTER on a free port for peers'
                                         messages + one lazily connected DEALER per peer

All three run their socket I/O on a dedicated thread (see `io_thread.py`):
`send*` encodes on the caller's thread (a bad message raises ProtocolError there) and
enqueues; `recv(timeout)` reads a queue. Every method is thread-safe and non-blocking
except `recv`, which waits at most `timeout` seconds (None: until a message or close()).
Tensor frames are sent with copy=False: do not modify a sent tensor until it has left.

Using it from asyncio (the router): either poll `recv(0.1)` in a background thread and
hand items over with `loop.call_soon_threadsafe`, or pass
`on_message=lambda item: loop.call_soon_threadsafe(aqueue.put_nowait, item)`, which the
I/O thread calls for each decoded message instead of queueing it (keep it short: it runs
on the I/O thread; exceptions are logged).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Hashable, Optional

import zmq

from cluster.wire.curve import CurveKeys
from cluster.wire.protocol import Message, ProtocolError, decode
from cluster.wire.io_thread import SocketLoop

__all__ = ["ControlClient", "ControlServer", "DataPlane"]
PEER_HEARTBEAT_MS = 1000         # ZMTP pings on bound sockets: a silent connection is closed
PEER_DEAD_MS = 5000              # ... after this long, freeing its identity


def _peer_id(frame: Any) -> str:
    """Our peers' identities are their worker ids; an anonymous peer gets "0x<hex>"."""
    raw = frame.bytes
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + raw.hex()


def _router_decode(frames: list) -> tuple[str, Message]:
    if len(frames) < 2:
        raise ProtocolError("a message needs at least one frame after the peer identity")
    return _peer_id(frames[0]), decode(frames[1:])


class ControlClient(SocketLoop):
    """Worker side of the control plane: DEALER with identity `worker_id`.

    Messages sent before the router is up are queued by ZeroMQ and leave once connected.
    Connectivity is watched: `num_connects` counts completed handshakes with the router (a
    second one means the router restarted or the link came back: register again), and
    `lost_since` is when the link went down (None while up).
    """

    def __init__(self, endpoint: str, worker_id: str,
                 on_message: Optional[Callable[[Message], None]] = None,
                 curve: Optional[CurveKeys] = None, arrivals: Optional[threading.Event] = None):
        super().__init__(f"control-client[{worker_id}]", on_message, curve, arrivals)
        self.endpoint, self.worker_id = endpoint, worker_id
        self._sock = self._socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_MS)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_DEAD_MS)
        self._dial_securely(self._sock)
        self.num_connects = 0
        self.lost_since: Optional[float] = time.monotonic()
        self._watch(self._sock, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError:
            self._abandon(self._sock)
            raise
        self._thread.start()

    def send(self, msg: Message) -> None:
        self._enqueue(None, msg)

    def _on_socket_event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.num_connects += 1
            self.lost_since = None
        elif event == zmq.EVENT_DISCONNECTED and self.lost_since is None:
            self.lost_since = time.monotonic()

    def recv(self, timeout: Optional[float] = None) -> Optional[Message]:
        return self._get(timeout)

    def _recv_sockets(self) -> list[zmq.Socket]:
        return [self._sock]

    def _parse(self, sock: zmq.Socket, frames: list) -> Message:
        return decode(frames)

    def _send_frames(self, key: Hashable, frames: list) -> None:
        self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)


class _BoundRouterLoop(SocketLoop):
    """Receives on one bound ROUTER socket (`self._sock`): messages come as (sender id, message)."""

    def recv(self, timeout: Optional[float] = None) -> Optional[tuple[str, Message]]:
        """(sender worker_id, message), or None on timeout / after close()."""
        return self._get(timeout)

    def _recv_sockets(self) -> list[zmq.Socket]:
        return [self._sock]

    def _parse(self, sock: zmq.Socket, frames: list) -> tuple[str, Message]:
        return _router_decode(frames)


class ControlServer(_BoundRouterLoop):
    """Router side of the control plane: ROUTER bound at `endpoint` (port 0 = a free port).

    `.endpoint` is the bound endpoint (the real port). A message to a worker that is not
    connected is dropped and counted in `num_send_errors` (ROUTER_MANDATORY). An identity
    in use cannot be taken over by a second connection (no ROUTER_HANDOVER); a dead or
    stopped peer's connection is dropped by ZeroMQ heartbeats, freeing its identity for
    the restarted worker.
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:0",
                 on_message: Optional[Callable[[tuple[str, Message]], None]] = None,
                 curve: Optional[CurveKeys] = None):
        super().__init__("control-server", on_message, curve)
        self._sock = _bound_router(self, endpoint)
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread.start()

    def send(self, worker_id: str, msg: Message) -> None:
        self._enqueue(worker_id, msg)

    def _send_frames(self, key: Hashable, frames: list) -> None:
        self._sock.send_multipart([str(key).encode(), *frames], zmq.NOBLOCK, copy=False)


class DataPlane(_BoundRouterLoop):
    """Worker-to-worker messages (decode_ready, kv_batch, kv_ack).

    Binds a ROUTER on a free port of `bind_host` (loopback by default); `.address`
    ("tcp://host:port") is what this worker advertises in `register`. `send_to(address,
    msg)` connects one DEALER per peer address on first use (identity = worker_id), so a
    peer sees `recv() -> (sender worker_id, message)`. `advertise_host` overrides the
    host in `.address` (needed when binding 0.0.0.0).
    """

    def __init__(self, worker_id: str, bind_host: str = "127.0.0.1",
                 advertise_host: Optional[str] = None,
                 on_message: Optional[Callable[[tuple[str, Message]], None]] = None,
                 curve: Optional[CurveKeys] = None, arrivals: Optional[threading.Event] = None):
        super().__init__(f"data-plane[{worker_id}]", on_message, curve, arrivals)
        self.worker_id = worker_id
        self._peers: dict[str, zmq.Socket] = {}      # address -> DEALER (I/O thread only)
        self._sock = _bound_router(self, f"tcp://{bind_host}:0")
        port = self._sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
        if advertise_host is None:
            wildcard = bind_host in ("0.0.0.0", "*", "::", "")
            advertise_host = socket.gethostname() if wildcard else bind_host
        self.address = f"tcp://{advertise_host}:{port}"
        self._thread.start()

    def send_to(self, address: str, msg: Message) -> None:
        self._enqueue(address, msg)

    def drop_peer(self, address: str) -> None:
        """Close the connection to a dead peer and discard what still waits for it."""
        self._enqueue(address, None)

    def _send_frames(self, key: Hashable, frames: list) -> None:
        peer = self._peers.get(key)
        if peer is None:
            peer = self._socket(zmq.DEALER)
            peer.setsockopt(zmq.IDENTITY, self.worker_id.encode())
            self._dial_securely(peer)
            try:
                peer.connect(key)
            except zmq.ZMQError:
                peer.close(linger=0)
                raise
            self._peers[key] = peer
        peer.send_multipart(frames, zmq.NOBLOCK, copy=False)

    def _forget(self, key: Hashable) -> None:
        peer = self._peers.pop(key, None)
        if peer is not None:
            peer.close(linger=0)

    def _close_sockets(self) -> None:
        for peer in self._peers.values():
            peer.close(linger=0)
        self._peers.clear()


def _bound_router(loop: SocketLoop, endpoint: str) -> zmq.Socket:
    sock = loop._socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, PEER_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, PEER_DEAD_MS)
    loop._serve_securely(sock)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        loop._abandon(sock)
        raise OSError(f"cannot bind {endpoint}: {e}") from e
    return sock
