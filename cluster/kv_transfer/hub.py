"""TransferHub: a worker's KV transfer backends and the choice among them.

Each backend has a sender half and a receiver half; the hub makes each half on first use.
A prefill worker packs with one backend's sender per decode peer (`sender_for`): the
configured one, or with `auto`, `cuda_ipc` for a peer on this host when the pool is on a
GPU, `shm` for a peer on this host when it is on the CPU (and its pool is in a shared
segment), `zmq` otherwise; the choice is logged once per peer. A decode worker unpacks each
kv_batch with the receiver of the backend the message names (`receiver_for`); with a fixed
backend it accepts only that one. All receivers of a worker share one ImportFence (one
import stream on CUDA): the worker's, which its model runner waits on too, when it passes
one in. Layer-wise streaming is per peer too (`streams_layers`).
"""
from __future__ import annotations

import importlib
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any, Optional

from cluster.config_types import KV_BACKENDS, KvTransferConfig
from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import ImportFence, KvTransferError
from cluster.kv_transfer.faults import KvFaults
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender

logger = logging.getLogger("pdcluster.kv_transfer")


# backend -> (its module in cluster/kv_transfer, sender class, receiver class); a module is
# imported on first use (nccl and cuda_ipc bring in torch.distributed and CUDA IPC)
BACKEND_CLASSES = {
    "zmq": ("zmq_backend", "ZmqSender", "ZmqReceiver"),
    "shm": ("shm_backend", "ShmSender", "ShmReceiver"),
    "cuda_ipc": ("cuda_ipc_backend", "CudaIpcSender", "CudaIpcReceiver"),
    "nccl": ("nccl_backend", "NcclSender", "NcclReceiver"),
}
SENDER, RECEIVER = 1, 2


def backend_class(name: str, half: int) -> type:
    """Backend `name`'s SENDER or RECEIVER class."""
    if name not in BACKEND_CLASSES:
        raise ValueError(f"no KV transfer backend {name!r}")
    entry = BACKEND_CLASSES[name]
    return getattr(importlib.import_module(f"cluster.kv_transfer.{entry[0]}"), entry[half])


def choose_backend(device_type: str, same_host: bool, has_shared_pool: bool) -> str:
    """What `auto` picks for one peer."""
    if same_host and device_type == "cuda":
        return "cuda_ipc"
    if same_host and device_type == "cpu" and has_shared_pool:
        return "shm"
    return "zmq"


def is_same_host(address: str) -> bool:
    """Whether a data-plane address (tcp://HOST:PORT) points at this host."""
    host = address.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        if host == "localhost":
            return True
    local = {socket.gethostname(), socket.getfqdn()}
    try:
        local |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return host in local


@dataclass(frozen=True)
class TpRanks:
    """The worker's tensor-parallel ranks as its KV handoff sees them (`rank_read.py`)."""
    size: int = 1
    num_kv_heads: int = 0              # the model's, over all ranks
    followers: Any = None              # rank 0's runtime.tp_ranks.TpFollowers: the other ranks
    timeout_s: float = 30.0            # a decode rank's wait for a read or for the other ranks
    curve: Any = None                  # the cluster's CURVE keys (slice servers and their clients)


class TransferHub:
    def __init__(self, config: KvTransferConfig, pool: KVPool, worker_id: str,
                 data_host: str = "127.0.0.1", data_addr: str = "", segment=None,
                 faults: Optional[KvFaults] = None, fence: Optional[ImportFence] = None,
                 ranks: Optional[TpRanks] = None):
        self.backend, self.verify, self.layerwise = config.backend, config.verify, config.layerwise
        self.pool, self.worker_id, self.data_host, self.segment = pool, worker_id, data_host, segment
        self.faults = faults if faults is not None else KvFaults.from_env()
        self.data_addr = data_addr                 # this worker's data-plane address (nccl pairs)
        self.fence = fence or ImportFence(pool.device)
        self._senders: dict[str, KvSender] = {}
        self._receivers: dict[str, KvReceiver] = {}
        self._chosen: dict[str, str] = {}          # peer address -> backend name (auto)
        self.ranks = ranks or TpRanks(1, pool.num_kv_heads)
        self._rank_halves: dict[tuple, Any] = {}   # (SENDER | RECEIVER, transport) -> rank_read half
        self._slice_server = None                  # rank 0's, once a peer reads over zmq

    def sender(self, name: str) -> KvSender:
        s = self._senders.get(name)
        if s is None:
            s = self._senders[name] = self._make_sender(name)
        return s

    def receiver(self, name: str) -> KvReceiver:
        r = self._receivers.get(name)
        if r is None:
            r = self._receivers[name] = self._make_receiver(name)
        return r

    def _make_sender(self, name: str) -> KvSender:
        extra = {"shm": {"segment": self.segment}, "nccl": {"data_host": self.data_host}}.get(name, {})
        return backend_class(name, SENDER)(pool=self.pool, worker_id=self.worker_id, verify=self.verify, **extra)

    def _make_receiver(self, name: str) -> KvReceiver:
        extra = {"nccl": {"data_addr": self.data_addr}}.get(name, {})
        return backend_class(name, RECEIVER)(pool=self.pool, worker_id=self.worker_id, verify=self.verify,
                                             fence=self.fence, **extra)

    def sender_for(self, peer_addr: str, peer_tp: int = 1) -> KvSender:
        """The sender for a decode peer; when either side has several TP ranks, the decode ranks
        read their heads (`rank_read.py`) over shm (same host, CPU) or zmq."""
        if self.ranks.size > 1 or peer_tp > 1:
            return self._rank_sender(self._read_transport(peer_addr))
        name = self._chosen.get(peer_addr)
        if name is None:
            name = self.backend
            if name == "auto":
                name = choose_backend(self.pool.device.type, is_same_host(peer_addr), self.segment is not None)
                logger.info("%s: kv_transfer auto -> %s for decode peer %s", self.worker_id, name, peer_addr)
            self._chosen[peer_addr] = name
        return self.sender(name)

    def streams_layers(self, backend: KvSender) -> bool:
        """Layer-wise for this peer's backend? `auto`: only where the bytes cross a socket (zmq):
        on 2 x H200 it cut zmq's TTFT by a third to a half, and added 2-14% with cuda_ipc and
        nccl, whose whole-request copy takes about a millisecond (BENCHMARKS.md)."""
        return self.layerwise is True or (self.layerwise == "auto" and backend.name == "zmq"
                                          and not backend.holds_pages)   # not reads between TP sizes

    def receiver_for(self, name: str, source: Optional[dict] = None) -> KvReceiver:
        if source is not None and "ranks" in source:   # reads between TP sizes: shm or zmq, whatever
            return self._rank_receiver(name)           # the configured backend (cuda_ipc, nccl: zmq)
        if self.backend not in ("auto", name) or name not in KV_BACKENDS:
            raise KvTransferError("backend", f"kv_batch sent with {name!r}, this worker takes "
                                  f"{self.backend!r}")
        if self.ranks.size > 1:
            raise KvTransferError("layout", f"one whole pool's KV sent to a worker of tp={self.ranks.size}")
        return self.receiver(name)

    # ---- reads between TP sizes (rank_read.py) ------------------------------------------
    def _read_transport(self, peer_addr: str) -> str:
        from cluster.kv_transfer.rank_read import TRANSPORTS
        if self.backend in TRANSPORTS:
            return self.backend
        # auto, cuda_ipc and nccl: reads between TP sizes go over shm (same host, CPU pools) or zmq
        same_host_cpu = self.pool.device.type == "cpu" and self.segment is not None and is_same_host(peer_addr)
        name = "shm" if same_host_cpu else "zmq"
        if self._chosen.get(peer_addr) != name:
            logger.info("%s: kv_transfer %s -> %s reads for decode peer %s (TP sizes differ)", self.worker_id,
                        self.backend, name, peer_addr)
            self._chosen[peer_addr] = name
        return name

    def _rank_sender(self, transport: str) -> KvSender:
        from cluster.kv_transfer.rank_read import RankReadSender, rank_source
        half = self._rank_halves.get((SENDER, transport))
        if half is None:
            if transport == "zmq" and self._slice_server is None:
                from cluster.kv_transfer.slice_server import SliceServer
                self._slice_server = SliceServer(self.pool, self.data_host, self.ranks.curve)
            own = rank_source(self.pool, self.segment, self._slice_server)
            others = self.ranks.followers.sources if self.ranks.followers is not None else {}
            sources = [own, *(others[r] for r in range(1, self.ranks.size))]
            half = RankReadSender(self.pool, self.worker_id, transport, sources, self.ranks.num_kv_heads,
                                  self.verify, self.ranks.followers, self.ranks.timeout_s)
            self._rank_halves[(SENDER, transport)] = half
        return half

    def _rank_receiver(self, transport: str) -> KvReceiver:
        from cluster.kv_transfer.rank_read import TRANSPORTS, RankReader, RankReadReceiver
        if transport not in TRANSPORTS:
            raise KvTransferError("backend", f"KV heads are read over {TRANSPORTS}, not {transport!r}")
        half = self._rank_halves.get((RECEIVER, transport))
        if half is None:
            r = self.ranks
            reader = RankReader(self.pool, 0, r.size, r.num_kv_heads, r.timeout_s, r.curve)
            half = RankReadReceiver(self.pool, self.worker_id, transport, reader, r.followers, r.timeout_s,
                                    self.fence, self.verify)
            self._rank_halves[(RECEIVER, transport)] = half
        return half

    def close(self) -> None:
        for half in [*self._senders.values(), *self._receivers.values(), *self._rank_halves.values()]:
            half.close()
        if self._slice_server is not None:
            self._slice_server.close()
