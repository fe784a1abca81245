"""`zmq`: the KV bytes travel as frames of the kv_batch message itself (any hosts).

Prefill: one gather of the request's pages into handoff layout; on CUDA into pinned host
memory (one device-to-host copy at tens of GB/s, ahead of a socket that moves ~2 GB/s), the
checksum taken on the device. ZeroMQ sends the pinned buffer itself (copy=False).
Decode: the frames are written straight into the reserved pages, row block by row block
(`FramedTensor.row_blocks`), with no gather into a fresh tensor first. On CUDA each frame
goes through pinned staging into one device buffer, verified there, then scattered into the
pages on the import stream.
Layer-wise: each kv_layers message carries one layer of each request (the staged pinned copy,
sent as soon as that layer is computed); the kv_batch then carries zero layers.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.kv_transfer.base import KvTransferError, Packed
from cluster.kv_transfer.checksum import fold64, xxh3_chunks
from cluster.kv_transfer.receiver import KvReceiver
from cluster.kv_transfer.sender import KvSender


class ZmqSender(KvSender):
    name = "zmq"
    stages_layers = True
    stages_to_host = True

    def pack(self, pages: list[int], length: int) -> Packed:
        kv = self.pool.export_kv(pages, length)
        checksum = self.checksum_of(kv)                  # on the device when there is one
        if kv.device.type == "cuda":
            host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
            host.copy_(kv, non_blocking=True)
            torch.cuda.current_stream(kv.device).synchronize()
            kv = host
        return Packed(checksum, kv.numel() * kv.element_size(), tensor=kv)

    def layer_payload(self, staged, layer: int) -> torch.Tensor:
        return (staged.host if staged.host is not None else staged.tensor)[layer:layer + 1]

    def rest_of(self, staged) -> torch.Tensor:
        return (staged.host if staged.host is not None else staged.tensor)[:0]


class ZmqReceiver(KvReceiver):
    name = "zmq"

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        if dst_pages is None or payload is None:
            return 0
        pool, length = self.pool, item.transfer_len
        first, end, whole = self.layer_span(layers)
        want = pool.handoff_shape(length, end - first)
        if tuple(payload.shape) != want or payload.dtype != pool.dtype:
            raise KvTransferError("shape", f"KV {tuple(payload.shape)} {payload.dtype} does not match "
                                  f"{want} {pool.dtype}")
        if first == end:
            return 0
        if pool.device.type == "cuda":
            self._unpack_cuda(item, payload, dst_pages, first, whole)
        else:
            if whole:
                self.check(item.checksum, lambda: xxh3_chunks(payload.chunks))
            rows = pool.handoff_rows(dst_pages, length).view(pool.num_layers, -1)[first:end].reshape(-1)
            flat = pool.kv.view(-1, pool.head_dim)
            for row, block in payload.row_blocks(pool.head_dim):
                flat.index_copy_(0, rows[row:row + block.shape[0]], block)
        return payload.nbytes

    def _unpack_cuda(self, item, payload, dst_pages: list[int], first: int, whole: bool) -> None:
        pool = self.pool
        with self.fence.stream():        # NOTE: allocated on the stream that uses it
            dev = torch.empty(payload.nbytes, dtype=torch.uint8, device=pool.device)
            off = 0
            for chunk in payload.chunks:
                staged = torch.empty(len(chunk), dtype=torch.uint8, pin_memory=True)
                staged.numpy()[:] = memoryview(chunk)
                dev[off:off + len(chunk)].copy_(staged, non_blocking=True)
                off += len(chunk)
            kv = dev.view(pool.dtype).view(payload.shape)
            if whole:
                self.check(item.checksum, lambda: fold64(kv))   # NOTE: before the pages go live
                pool.import_kv(dst_pages, kv)
            else:
                pool.import_kv(dst_pages, kv, first_layer=first)
        self.fence.record()
