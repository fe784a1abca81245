"""Reading a slice of KV heads out of another process's pool over ZeroMQ (the `zmq` transport of a
handoff between TP sizes, `rank_read.py`).

`SliceServer`: a thread in each prefill rank, a ROUTER bound on the data host. A request names
pages, a head range and a layer range of this rank's pool; the answer is those pages' heads as one
frame, `[layers, planes, heads, pages, page_size, head_dim]` in the pool's dtype. The pages are
read in place: the prefill worker holds them until the decode worker's kv_ack.
`SliceClient`: the decode rank's side, one DEALER per server, every wait bounded.
Requests and answers are msgpack maps plus one raw frame (no pickle).
"""
from __future__ import annotations

import logging
import threading
from typing import Optional

import msgpack
import torch
import zmq

from cluster.kv_transfer.base import KvTransferError
from cluster.wire.tensor_frames import DTYPE_NAMES, DTYPES

logger = logging.getLogger("pdcluster.kv_transfer")

POLL_MS = 50              # how soon close() is noticed


class SliceServer:
    def __init__(self, pool, host: str = "127.0.0.1", curve=None):
        self.pool = pool
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.serve(self.sock)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-slices", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(POLL_MS):
                continue
            ident, body = self.sock.recv_multipart()[:2]
            try:
                req = msgpack.unpackb(body)
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
        if not (0 <= h0 and h0 + count <= kv.shape[2] and 0 <= l0 <= l1 <= kv.shape[0]):
            raise ValueError(f"heads {heads} layers {layers} of a pool {tuple(kv.shape)}")
        idx = torch.tensor(pages, dtype=torch.int64, device=kv.device)
        return kv[l0:l1, :, h0:h0 + count].index_select(3, idx).cpu().contiguous()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * POLL_MS / 1000)
        self.sock.close(linger=0)


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
