"""KvIntake: a decode worker's landing of prefilled KV in the pages its requests reserved.

A `kv_layers` message (layer-wise streaming) lands its layers at once; a `kv_batch` lands the
rest of each request (often nothing) and verifies the whole. Each item counts only from the
prefill worker the router paired its request with, for the request's current KV attempt;
anything else is not expected (aborted, timed out, or an older attempt) and lands nowhere,
though the backend still reads it (nccl keeps one pair's sends and receives in order).
The scheduler acts on the outcome: it starts the landed requests and fails or retries the rest.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

from cluster.kv_transfer import KvTransferError, TransferHub
from cluster.runtime.schedule_batch import Req
from cluster.wire import protocol as P
from decode_worker.layer_landing import LayerLanding
from decode_worker.transfer_queue import TransferQueue


@dataclass(frozen=True, slots=True)
class Landed:
    item: "P.KvReq"
    req: Req
    num_bytes: int                  # on every rank of a TP worker (kv_transfer_bytes_total)
    import_s: float


@dataclass(frozen=True, slots=True)
class Refused:
    item: "P.KvReq"
    req: Optional[Req]              # None: not expected, nothing to fail or retry here
    error: KvTransferError


class KvIntake:
    def __init__(self, transfer: TransferHub, transfer_queue: TransferQueue, page_size: int):
        self.transfer, self.transfer_queue, self.page_size = transfer, transfer_queue, page_size
        self.landing = LayerLanding()          # layers landed ahead of their kv_batch

    def expecting(self, item, prefill_worker_id: str) -> Optional[Req]:
        """The request an item is for, if it still waits for this very KV."""
        req = self.transfer_queue.peek(item.rid)
        if (req is not None and item.attempt == req.kv_attempt
                and req.peer is not None and req.peer.worker_id == prefill_worker_id):
            return req
        return None

    def land_layers(self, msg: "P.KvLayers") -> None:
        """Layer-wise: land these layers now; a failure is reported with the request's kv_batch."""
        payloads = msg.tensors or [None] * len(msg.reqs)
        for span, payload in zip(msg.reqs, payloads):
            req = self.expecting(span, msg.prefill_worker_id)
            try:
                if req is not None:
                    check_shape(req, span)
                    self.landing.expect(span.rid, span.attempt, msg.layer)
                num_bytes = self.unpack(msg, span, payload, req, (msg.layer, msg.layer + msg.num_layers))
                if req is not None:
                    self.landing.landed(span.rid, msg.num_layers, num_bytes)
            except KvTransferError as e:
                if req is not None:
                    self.landing.failed(span.rid, span.attempt, e)

    def land_batch(self, msg: "P.KvBatch") -> tuple[list[Landed], list[Refused], list[str]]:
        """-> (landed, refused, not expected rids): the kv_batch's requests' KV in their pages."""
        landed, refused, unexpected = [], [], []
        payloads = msg.tensors or [None] * len(msg.reqs)
        num_layers = self.transfer.pool.num_layers
        for item, payload in zip(msg.reqs, payloads):
            req = self.expecting(item, msg.prefill_worker_id)
            t0 = time.perf_counter()
            try:
                if req is not None:
                    check_shape(req, item)
                if item.layers_sent:             # the rest (usually none), then the whole is verified
                    ahead = self.landing.take(item.rid, item.attempt, item.layers_sent) if req is not None else 0
                    num_bytes = ahead + self.unpack(msg, item, payload, req,
                                                    (min(item.layers_sent, num_layers), num_layers))
                    if req is not None:
                        self.transfer.receiver_for(msg.backend, msg.source).verify_landed(
                            item, self.pages_of(req, item))
                else:
                    num_bytes = self.unpack(msg, item, payload, req, None)
            except KvTransferError as e:
                refused.append(Refused(item, req, e))
                continue
            if req is not None:
                landed.append(Landed(item, req, num_bytes, time.perf_counter() - t0))
            elif self.transfer_queue.peek(item.rid) is None:
                unexpected.append(item.rid)      # aborted or timed out; else a late older attempt
        self.transfer.fence.synchronize()        # NOTE: the prefill side may reuse its pages once acked
        return landed, refused, unexpected

    def unpack(self, msg, item, payload, req: Optional[Req], layers) -> int:
        if item.tp != 1 and "ranks" not in msg.source:
            raise KvTransferError("layout", f"one pool's KV from a prefill worker of tp={item.tp}")
        backend = self.transfer.receiver_for(msg.backend, msg.source)
        dst = self.pages_of(req, item) if req is not None else None
        return backend.unpack(msg.prefill_worker_id, msg.source, item, payload, dst, layers)

    def pages_of(self, req: Req, item) -> list[int]:
        """The pages that take positions [held_len, seq_len): decode already holds the rest."""
        return req.page_table[item.held_len // self.page_size:]

    def forget(self, rid: str) -> None:
        self.landing.forget(rid)


def check_shape(req: Req, item) -> None:
    if item.seq_len != req.seq_len:
        raise KvTransferError("shape", f"KV of {item.seq_len} tokens for a {req.seq_len}-token request")
    if item.held_len != req.cached_len:
        raise KvTransferError("shape", f"KV after {item.held_len} held tokens, but "
                              f"{req.cached_len} are held here")
