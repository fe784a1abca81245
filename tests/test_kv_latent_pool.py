"""The latent KV pool (MLA: one plane, one "head" of kv_lora_rank + rope values per token) through
the same handoff as K/V pools: export/import, zmq frames and shm pages land bit-exact, checksums
catch a flipped value, a layer slice imports alone, and the bytes per token are the latent's."""
from __future__ import annotations

import pytest
import torch

from cluster.config import KvTransferConfig
from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer import KvTransferError, TransferHub
from cluster.kv_transfer.shm_backend import shared_pool_storage
from cluster.wire import protocol as P
from tests.test_kv_transfer import hand_off

RANK, ROPE, LAYERS = 16, 4, 3
VERIFIED = KvTransferConfig("zmq", verify=True)
LATENT = dict(num_layers=LAYERS, num_kv_heads=1, head_dim=RANK + ROPE, page_size=4, num_planes=1)


def latent_pool(num_pages: int, seed: int = 0, storage=None) -> KVPool:
    pool = KVPool(num_pages=num_pages, storage=storage, **LATENT)
    if seed:
        pool.kv.copy_(torch.randn(pool.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return pool


def test_latent_pool_layout_and_bytes_per_token():
    pool = latent_pool(8)
    assert pool.kv.shape == (LAYERS, 1, 1, 8, 4, RANK + ROPE)
    assert [tuple(c[0].shape) for c in pool.layer_caches()] == [(1, 8, 4, RANK + ROPE)] * LAYERS
    assert all(len(c) == 1 for c in pool.layer_caches())
    assert pool.request_bytes(10) == 10 * (RANK + ROPE) * LAYERS * 4


def test_latent_export_import_round_trip_and_layer_slice():
    src, dst = latent_pool(8, seed=1), latent_pool(8)
    kv = src.export_kv([5, 2, 7], 11)
    assert kv.shape == (LAYERS, 1, 11, 1, RANK + ROPE) and kv.is_contiguous()
    dst.import_kv([0, 1, 3], kv[1:2], first_layer=1)
    assert torch.equal(dst.export_kv([0, 1, 3], 11)[1], kv[1]) and dst.kv[0].abs().sum() == 0
    dst.import_kv([0, 1, 3], kv)
    assert torch.equal(dst.export_kv([0, 1, 3], 11), kv)
    with pytest.raises(ValueError, match="expected"):
        dst.import_kv([0, 1, 3], torch.zeros(LAYERS, 2, 11, 1, RANK + ROPE))   # K/V-shaped: refused


@pytest.mark.parametrize("frame_bytes", [P.FRAME_BYTES, 60])
def test_zmq_moves_the_latent_bit_exact(frame_bytes):
    src, dst = latent_pool(16, seed=2), latent_pool(12)
    n = hand_off(TransferHub(VERIFIED, src, "prefill-0"), TransferHub(VERIFIED, dst, "decode-0"),
                 [3, 7, 8, 1], [9, 2, 3, 5], 14, frame_bytes)
    assert n == 14 * (RANK + ROPE) * LAYERS * 4
    assert torch.equal(dst.export_kv([9, 2, 3, 5], 14), src.export_kv([3, 7, 8, 1], 14))


def test_shm_copies_latent_pages():
    storage, seg = shared_pool_storage((LAYERS, 1, 1, 16, 4, RANK + ROPE), torch.float32)
    src, dst = latent_pool(16, seed=3, storage=storage), latent_pool(8)
    shm = KvTransferConfig("shm", verify=True)
    hand_off(TransferHub(shm, src, "prefill-0", segment=seg), TransferHub(shm, dst, "decode-0"),
             [5, 6, 7, 2], [0, 1, 2, 3], 13)
    assert torch.equal(dst.export_kv([0, 1, 2, 3], 13), src.export_kv([5, 6, 7, 2], 13))


def test_latent_checksum_catches_a_flipped_value():
    src, dst = latent_pool(8, seed=4), latent_pool(8)
    backend = TransferHub(VERIFIED, src, "prefill-0").sender_for("tcp://127.0.0.1:1")
    packed = backend.pack([0, 1], 6)
    backend.corrupt(packed)
    msg = P.decode([bytes(f) for f in P.encode(P.KvBatch(
        1, "prefill-0", [P.KvReq("r", 1, 6, checksum=packed.checksum)], [packed.tensor]))])
    with pytest.raises(KvTransferError, match="checksum"):
        TransferHub(VERIFIED, dst, "decode-0").receiver_for("zmq").unpack("prefill-0", {}, msg.reqs[0],
                                                                       msg.tensors[0], [4, 5])
    assert dst.kv.abs().sum() == 0
