"""`cuda_ipc`: GPUs of one host; the decode side maps the prefill pool once and copies pages
device to device (over NVLink between H200s).

The prefill worker exports its pool tensor's CUDA IPC handle (`UntypedStorage._share_cuda_`)
as plain values, bytes as hex strings in the kv_batch's msgpack body: never pickled. The
decode worker opens it once per prefill process (`_new_shared_cuda`, in its own device's
context: CUDA enables peer access lazily, so the prefill GPU must be visible to the decode
process; the launcher lists every GPU of the cluster in CUDA_VISIBLE_DEVICES, the worker's
own first). Page copies run on the import stream (`page_reading.py`) and are ordered by CUDA
events: the forward stream waits on them, and kv_ack leaves only once they are done, so the
prefill side never reuses pages that are still being read. Checksums are `fold64`, on the device.
Layer-wise: a kv_layers message for layer i leaves once layer i's kernels have finished on the
prefill GPU, and decode copies that layer of the request's pages when it reads the message.
"""
from __future__ import annotations

from typing import Optional

import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.checksum import kv_checksum
from cluster.kv_transfer.page_reading import PageReadingReceiver, PageReadingSender, boot_id
from cluster.wire.torch_dtypes import DTYPE_NAMES, DTYPES


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


class CudaIpcSender(PageReadingSender):
    name = "cuda_ipc"

    def __init__(self, pool: KVPool, worker_id: str, verify: bool = True):
        super().__init__(pool, worker_id, verify)
        self._source: Optional[dict] = None

    def source(self) -> dict:
        if self._source is None:
            self._source = share_pool(self.pool.kv)
        return self._source

    def pages_checksum(self, pages: list[int], length: int) -> int:
        return kv_checksum(self.pool.export_kv(pages, length))


class CudaIpcReceiver(PageReadingReceiver):
    name = "cuda_ipc"
    peer_kind = "GPU pool (CUDA IPC)"

    def peer_key(self, source: dict) -> tuple:
        return source["handle"], source["offset_bytes"]

    def open_peer(self, source: dict) -> torch.Tensor:
        return open_pool(source, self.pool.device)
