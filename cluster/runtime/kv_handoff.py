"""KvHandoff: the part of a prefill or decode worker that moves KV to or from its peer.

It owns the worker's data plane (ZeroMQ, worker to worker), its TransferHub (the KV
transfer backends), the transfer stats it reports in heartbeats, the check that a
message's body names the peer that really sent it, and closing all of that. Both
disaggregated schedulers take one through their constructor; the worker's entry builds
it once (`KvHandoff.open`).

It sits in `cluster/runtime/` because it composes three layers below it (`wire/` for the
data plane, `kv_transfer/` for the backends, `runtime/stats.py` for the gauges); the
`kv_transfer` package itself stays free of sockets and metrics.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterator, Optional

from cluster.config_types import KvTransferConfig
from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer import TransferHub
from cluster.runtime.stats import KvTransferStats
from cluster.wire import protocol as P
from cluster.wire.transport import DataPlane

logger = logging.getLogger("pdcluster.kv_handoff")


def claimed_sender(msg) -> Optional[str]:
    """The worker a data-plane message's body says it comes from (None: it names none)."""
    if isinstance(msg, P.DecodeReady):
        return msg.decode.worker_id
    if isinstance(msg, P.KvAck):
        return msg.decode_worker_id
    if isinstance(msg, (P.KvBatch, P.KvLayers)):
        return msg.prefill_worker_id
    return None


class KvHandoff:
    def __init__(self, data_plane: DataPlane, transfer: TransferHub):
        if transfer.data_addr != data_plane.address:
            raise ValueError(f"transfer hub of {transfer.data_addr!r} on data plane {data_plane.address!r}")
        self.data_plane, self.transfer = data_plane, transfer
        self.stats = KvTransferStats()

    @classmethod
    def open(cls, worker_id: str, pool: KVPool, config: KvTransferConfig, *, bind_host: str = "127.0.0.1",
             curve=None, arrivals: Optional[threading.Event] = None, **hub) -> "KvHandoff":
        """A fresh data plane on `bind_host` (setting `arrivals` on each message) and a hub over
        `pool` as `config` says (`hub`: TransferHub's other keyword arguments)."""
        data_plane = DataPlane(worker_id, bind_host=bind_host, curve=curve, arrivals=arrivals)
        return cls(data_plane, TransferHub(config, pool, worker_id, data_host=bind_host,
                                           data_addr=data_plane.address, **hub))

    @property
    def worker_id(self) -> str:
        return self.data_plane.worker_id

    @property
    def address(self) -> str:
        """This worker's data-plane address, as peers reach it."""
        return self.data_plane.address

    # ---- messages ------------------------------------------------------------------
    def received(self) -> Iterator[tuple[str, object]]:
        """(sender, message) for each data-plane message waiting now; one whose body names
        another worker than the one that sent it is counted and dropped."""
        while (got := self.data_plane.recv(timeout=0)) is not None:
            sender, msg = got
            claimed = claimed_sender(msg)
            if claimed is not None and claimed != sender:
                self.count_rejected("wrong_peer")
                logger.warning("%s: %s from %s claims to be from %s: dropped", self.worker_id,
                               type(msg).__name__, sender, claimed)
                continue
            yield sender, msg

    def send_to(self, address: str, msg) -> None:
        self.data_plane.send_to(address, msg)

    def drop_peer(self, address: str) -> None:
        """A peer silent too long: release what is still queued for it."""
        self.data_plane.drop_peer(address)

    def count_rejected(self, reason: str) -> None:
        self.data_plane.count_rejected(reason)

    # ---- gauges ----------------------------------------------------------------------
    def gauges(self) -> dict:
        """Its transfer counters as `WorkerGauges` fields (the time histogram is prefill's alone)."""
        return self.stats.gauges()

    @property
    def num_protocol_errors(self) -> int:
        return self.data_plane.num_protocol_errors

    @property
    def rejected_frames(self) -> dict[str, int]:
        return dict(self.data_plane.rejected_frames)

    def close(self) -> None:
        self.data_plane.close()
        self.transfer.close()
