"""`cuda_ipc`: GPUs of one host; the decode side maps the prefill pool once and copies pages
device to device (over NVLink between H200s).

The prefill worker exports its pool tensor's CUDA IPC handle (`UntypedStorage._share_cuda_`)
as plain values, bytes as hex strings in the kv_batch's msgpack body: never pickled. The
decode worker opens it once per prefill process (`_new_shared_cuda`, in its own device's
context: CUDA enables peer access lazily, so the prefill GPU must be visible to the decode
process; the launcher lists every GPU of the cluster in CUDA_VISIBLE_DEVICES, the worker's
own first). Page copies run on the import stream and are ordered by CUDA events: the forward
stream waits on them, and kv_ack leaves only once they are done, so the prefill side never
reuses pages that are still being read. Checksums are `fold64`, on the device.
Layer-wise: a kv_layers message for layer i leaves once layer i's kernels have finished on the
prefill GPU, and decode copies that layer of the request's pages when it reads the message.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransfer, KvTransferError, Packed
from cluster.kv_transfer.page_copy import copy_pages
from cluster.kv_transfer.shm_backend import boot_id
from cluster.wire.tensor_frames import DTYPE_NAMES, DTYPES


def share_pool(kv: torch.Tensor) -> dict:
    """The IPC description of a CUDA tensor: plain ints and hex strings."""
    (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
     event_sync) = kv.untyped_storage()._share_cuda_()
    hexed = lambda b: b.hex() if isinstance(b, (bytes, bytearray)) else ""  # noqa: E731
    return {"handle": hexed(handle), "size_bytes": int(size_bytes), "offset_bytes": int(offset_bytes),
            "ref_handle": hexed(ref_handle), "ref_offset": int(ref_offset),
            "event_handle": hexed(event_handle), "event_sync": bool(event_sync),
            "tensor_offset": kv.storage_offset(), "shape": list(kv.shape), "stride": list(kv.stride()),
            "dtype": DTYPE_NAMES[kv.dtype], "boot_id": boot_id()}


def open_pool(source: dict, device: torch.device) -> torch.Tensor:
    """Map a peer's pool described by `share_pool` into this process, on `device`'s context."""
    unhex = lambda s: bytes.fromhex(s) if s else b""  # noqa: E731
    index = device.index if device.index is not None else torch.cuda.current_device()
    storage = torch.UntypedStorage._new_shared_cuda(
        index, unhex(source["handle"]), source["size_bytes"], source["offset_bytes"],
        unhex(source["ref_handle"]), source["ref_offset"], unhex(source["event_handle"]),
        source["event_sync"])
    dtype = DTYPES[source["dtype"]]
    t = torch.empty((0,), dtype=dtype, device=torch.device("cuda", index))
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    return t.set_(typed, source["tensor_offset"], source["shape"], source["stride"])


class CudaIpcTransfer(KvTransfer):
    name = "cuda_ipc"
    holds_pages = True

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True, fence=None):
        super().__init__(pool, worker_id, verify, fence)
        self._source: Optional[dict] = None
        self._peers: dict[tuple, torch.Tensor] = {}

    def source(self) -> dict:
        if self._source is None:
            self._source = share_pool(self.pool.kv)
        return self._source

    def pack(self, pages: list[int], length: int) -> Packed:
        num = self.pool.pages_for(length)
        checksum = self.checksum_of(self.pool.export_kv(pages, length)) if self.verify else None
        # NOTE: the prefill forward that wrote these pages has finished: its sampled tokens
        # were read on the host before this runs
        return Packed(checksum, self.pool.request_bytes(length), src_pages=list(pages[:num]))

    def unpack(self, sender: str, source: dict, item, payload, dst_pages: Optional[list[int]],
               layers: Optional[tuple[int, int]] = None) -> int:
        if dst_pages is None:
            return 0
        if source.get("boot_id") != boot_id():
            raise KvTransferError("unreachable", f"{sender}'s GPU is on another host")
        first, end, whole = self.layer_span(layers)
        src = self._map(sender, source)
        src_pages, length = self.source_pages(sender, src, item), item.transfer_len
        with self.fence.stream():
            copy_pages(src[first:end], self.pool.kv[first:end], src_pages, dst_pages[:len(src_pages)])
            if whole:
                self.check(item.checksum, lambda: self.landed_checksum(dst_pages, length))
        return self.pool.request_bytes(length) * (end - first) // self.pool.num_layers

    def _map(self, sender: str, source: dict) -> torch.Tensor:
        key = (sender, source["handle"], source["offset_bytes"])
        src = self._peers.get(key)
        if src is None:
            try:
                src = open_pool(source, self.pool.device)
            except (RuntimeError, ValueError, KeyError) as e:
                raise KvTransferError("unreachable", f"cannot open {sender}'s CUDA IPC handle: {e}") from None
            self._peers = {k: v for k, v in self._peers.items() if k[0] != sender}
            self._peers[key] = src
        return src

    def close(self) -> None:
        self._peers.clear()
