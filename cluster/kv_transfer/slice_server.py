"""Reading a slice of KV heads out of another process's pool over ZeroMQ (the `zmq` transport of a
handoff between TP sizes, `rank_read.py`).

`SliceServer`: a thread in each prefill rank, a ROUTER bound on the data host. A request names
pages, a head range and a layer range of this rank's pool; the answer is those pages' heads as one
frame, `[layers, planes, heads, pages, page_size, head_dim]` in the pool's dtype. The pages are
read in place: the prefill worker holds them until the decode worker's kv_ack.
`SliceClient`: the decode rank's side, one DEALER per server, every wait bounded.
Requests and answers are msgpack maps plus one raw frame (no pickle).
With CURVE keys the server is a CURVE server with its own ZAP handler (on its thread, in its own
context, as `wire/io_thread.py` does for the other bound sockets): only clients holding the cluster
key pair are admitted.
"""
from __future__ import annotations

import logging
import threading

import msgpack
import torch
import zmq

from cluster.kv_transfer.base import KvTransferError
from cluster.wire.curve import ZAP_ENDPOINT
from cluster.wire.torch_dtypes import DTYPE_NAMES, DTYPES

logger = logging.getLogger("pdcluster.kv_transfer")

POLL_MS = 50              # how soon close() is noticed
CLOSE_TIMEOUT_S = 2.0


MAX_REQUEST_BYTES = 1 << 20   # a request names pages, not data: a megabyte is thousands of pages


def decode_request(frames: list, pool_shape) -> dict:
    """A slice request checked before anything is read: one msgpack map of an int id, page numbers
    inside the pool, and [start, count] heads / [first, end) layers of plain ints."""
    if len(frames) != 1 or len(frames[0]) > MAX_REQUEST_BYTES:
        raise ValueError(f"a slice request is one frame of at most {MAX_REQUEST_BYTES} bytes")
    req = msgpack.unpackb(frames[0], raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)

    def ints(v, n=None):
        ok = isinstance(v, list) and all(type(x) is int for x in v) and (n is None or len(v) == n)
        if not ok:
            raise ValueError(f"expected {n or 'a list of'} ints, got {str(v)[:64]}")
        return v
    if not isinstance(req, dict) or type(req.get("id")) is not int:
        raise ValueError("a slice request is a map with an int id")
    pages = ints(req.get("pages"))
    if any(p < 0 or p >= pool_shape[3] for p in pages):
        raise ValueError(f"page numbers outside the pool's {pool_shape[3]}")
    return {"id": req["id"], "pages": pages, "heads": ints(req.get("heads"), 2), "layers": ints(req.get("layers"), 2)}


class SliceServer:
    def __init__(self, pool, host: str = "127.0.0.1", curve=None):
        self.pool, self.curve = pool, curve
        self._ctx = zmq.Context(io_threads=1)    # its own: the ZAP endpoint is one per context
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._zap = None
        if curve is not None:
            self._zap = self._ctx.socket(zmq.REP)
            self._zap.setsockopt(zmq.LINGER, 0)
            self._zap.bind(ZAP_ENDPOINT)         # NOTE: before the bind, so no handshake goes unchecked
            curve.serve(self.sock)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-slices", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (self.sock, self._zap):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self._zap in ready:
                self.curve.answer_zap(self._zap)
            if self.sock in ready:
                self._serve_one()

    def _serve_one(self) -> None:
        frames = self.sock.recv_multipart()
        ident, req = frames[0], None
        try:
            req = decode_request(frames[1:], self.pool.kv.shape)
            part = self.read(req["pages"], req["heads"], req["layers"])
            header = {"id": req["id"], "shape": list(part.shape), "dtype": DTYPE_NAMES[part.dtype]}
            self.sock.send_multipart([ident, msgpack.packb(header), part.reshape(-1).view(torch.uint8).numpy()],
                                     copy=False)
        except Exception as e:     # a bad request is answered, never fatal
            logger.warning("kv slice request refused: %s", e)
            rid = req.get("id") if isinstance(req, dict) else None
            self.sock.send_multipart([ident, msgpack.packb({"id": rid, "error": str(e)})])

    @torch.inference_mode()
    def read(self, pages: list[int], heads: list[int], layers: list[int]) -> torch.Tensor:
        kv, (h0, count), (l0, l1) = self.pool.kv, heads, layers
        if not (0 <= h0 and 0 <= count and h0 + count <= kv.shape[2] and 0 <= l0 <= l1 <= kv.shape[0]):
            raise ValueError(f"heads {heads} layers {layers} of a pool {tuple(kv.shape)}")
        idx = torch.tensor(pages, dtype=torch.int64, device=kv.device)
        return kv[l0:l1, :, h0:h0 + count].index_select(3, idx).cpu().contiguous()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CLOSE_TIMEOUT_S)
        for sock in (self.sock, self._zap):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()


class SliceClient:
    """One rank's reads from the slice servers of its prefill peers."""

    def __init__(self, timeout_s: float, curve=None):
        self.timeout_s, self.curve = timeout_s, curve
        self._socks: dict[str, zmq.Socket] = {}
        self._next_id = 0

    def _sock(self, address: str) -> zmq.Socket:
        sock = self._socks.get(address)
        if sock is None:
            sock = self._socks[address] = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.dial(sock)
            sock.connect(address)
        return sock

    def read(self, address: str, pages: list[int], heads: tuple[int, int], layers: tuple[int, int]) -> torch.Tensor:
        self._next_id += 1
        rid, sock = self._next_id, self._sock(address)
        sock.send(msgpack.packb({"id": rid, "pages": list(pages), "heads": list(heads), "layers": list(layers)}))
        while True:      # answers of earlier, abandoned reads are skipped
            if not sock.poll(int(self.timeout_s * 1000)):
                self._socks.pop(address).close(linger=0)
                raise KvTransferError("unreachable", f"no KV slice from {address} within {self.timeout_s:g}s")
            frames = sock.recv_multipart()
            header = msgpack.unpackb(frames[0])
            if header.get("id") != rid:
                continue
            if "error" in header:
                raise KvTransferError("shape", f"{address} refused the read: {header['error']}")
            dtype = DTYPES[header["dtype"]]
            return torch.frombuffer(bytearray(frames[1]), dtype=dtype).view(header["shape"])

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()
