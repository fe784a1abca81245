"""Reads of KV heads between TP sizes, in process: each decode rank's pool ends up holding exactly
its heads of what the prefill ranks computed, over shm and zmq, whole or layer by layer, and lands
exactly its share of the bytes; a layout it cannot map is refused with reason `layout`."""
import pytest
import torch

from cluster.engine.kv_cache import KVPool
from cluster.kv_transfer.base import KvTransferError
from cluster.kv_transfer.head_map import HeadSplit
from cluster.kv_transfer.rank_read import RankReader, RankReadSender, import_job, rank_source
from cluster.kv_transfer.shm_backend import shared_pool_storage
from cluster.kv_transfer.slice_server import SliceServer
from cluster.wire import protocol as P

LAYERS, KV_HEADS, HEAD_DIM, PAGES, PAGE_SIZE = 2, 3, 4, 8, 4
SEQ_LEN = 10                                  # three pages, the last one partial
SRC_PAGES, DST_PAGES = [5, 1, 6], [2, 3, 7]
READ_TIMEOUT_S = 30          # bounds a hang only: a local read is answered in ms, on a loaded box in more


def pool(heads: int, storage=None) -> KVPool:
    return KVPool(LAYERS, heads, HEAD_DIM, PAGES, PAGE_SIZE, storage=storage)


class PrefillRanks:
    """A prefill worker of `tp` ranks: each pool holds its heads of one full-model KV."""

    def __init__(self, full: torch.Tensor, tp: int, transport: str):
        split = HeadSplit(KV_HEADS, tp)
        self.pools, self.sources, self.closers = [], [], []
        for rank in range(tp):
            storage, segment = shared_pool_storage((LAYERS, 2, split.heads_per_rank, PAGES, PAGE_SIZE, HEAD_DIM),
                                                   torch.float32)
            p = pool(split.heads_per_rank, storage)
            first = split.first_head(rank)
            p.kv.copy_(full[:, :, first:first + split.heads_per_rank])
            server = SliceServer(p) if transport == "zmq" else None
            self.pools.append(p)
            self.sources.append(rank_source(p, segment, server))
            self.closers += [c for c in (server, segment) if c is not None]
        self.sender = RankReadSender(self.pools[0], "prefill-0", transport, self.sources, KV_HEADS)

    def item(self, **kw) -> "P.KvReq":
        packed = self.sender.pack(SRC_PAGES, SEQ_LEN)
        layout = {"tp": len(self.pools), "heads_per_rank": self.pools[0].num_kv_heads, **kw}
        return P.KvReq("r1", 42, SEQ_LEN, src_pages=packed.src_pages, **layout)

    def close(self):
        for c in self.closers:
            c.close()


@pytest.fixture
def full():
    torch.manual_seed(0)
    return torch.randn(LAYERS, 2, KV_HEADS, PAGES, PAGE_SIZE, HEAD_DIM)


@pytest.mark.parametrize("transport", ["shm", "zmq"])
@pytest.mark.parametrize("src_tp,dst_tp", [(1, 3), (3, 1), (3, 3), (1, 1)])
def test_each_decode_rank_lands_exactly_its_heads(full, transport, src_tp, dst_tp):
    prefill = PrefillRanks(full, src_tp, transport)
    try:
        item, dst = prefill.item(), HeadSplit(KV_HEADS, dst_tp)
        source = prefill.sender.source()
        # the message the decode worker gets checks out on the wire (no tensors: nothing is pushed)
        P.decode(P.encode(P.KvBatch(3, "prefill-0", [item], [], backend=transport, source=source)))
        for rank, layerwise in ((r, lw) for r in range(dst_tp) for lw in (False, True)):
            p = pool(dst.heads_per_rank)
            reader = RankReader(p, rank, dst_tp, KV_HEADS, timeout_s=READ_TIMEOUT_S)
            # layer-wise: each layer as its kv_layers message names it, then the kv_batch's empty rest
            spans = [(l, l + 1) for l in range(LAYERS)] + [(LAYERS, LAYERS)] if layerwise else [(0, LAYERS)]
            landed = sum(reader.land(transport, "prefill-0", source, import_job(item, DST_PAGES, span))
                         for span in spans)
            reader.close()
            first = dst.first_head(rank)
            want = full[:, :, first:first + dst.heads_per_rank][:, :, :, SRC_PAGES]
            torch.testing.assert_close(p.kv[:, :, :, DST_PAGES], want, rtol=0, atol=0)
            assert landed == p.request_bytes(SEQ_LEN)          # its share: its heads, nothing more
            assert landed * dst_tp == prefill.sender.pack(SRC_PAGES, SEQ_LEN).num_bytes
    finally:
        prefill.close()


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 3), (3, 1)])
def test_with_verify_the_decode_ranks_heads_check_against_the_prefill_ranks_checksum(full, src_tp, dst_tp):
    """Each rank hashes only its own heads; combined in head order they give one checksum, whatever
    the split on either side, and a changed value in any rank's landed heads changes it."""
    from cluster.kv_transfer.checksum import combine_head_checksums, head_checksums
    prefill = PrefillRanks(full, src_tp, "shm")
    try:
        split = HeadSplit(KV_HEADS, src_tp)
        sent = {}
        for rank, p in enumerate(prefill.pools):
            sent |= head_checksums(p, SRC_PAGES, SEQ_LEN, split.first_head(rank))
        expected = combine_head_checksums(sent, KV_HEADS)
        if src_tp == 1:   # a prefill worker of one rank computes it alone
            alone = RankReadSender(prefill.pools[0], "prefill-0", "shm", prefill.sources, KV_HEADS, verify=True)
            assert alone.pack(SRC_PAGES, SEQ_LEN).checksum == expected
        item, source = prefill.item(checksum=expected), prefill.sender.source()
        landed, readers = {}, []
        for rank in range(dst_tp):
            reader = RankReader(pool(HeadSplit(KV_HEADS, dst_tp).heads_per_rank), rank, dst_tp, KV_HEADS,
                                timeout_s=READ_TIMEOUT_S)
            job = import_job(item, DST_PAGES, (0, LAYERS), verify=True)
            reader.land("shm", "prefill-0", source, job)
            landed |= reader.head_checksums(job)
            readers.append((reader, job))
        assert combine_head_checksums(landed, KV_HEADS) == expected
        reader, job = readers[-1]
        reader.pool.kv[1, 1, 0, DST_PAGES[-1], 0, 0] += 1.0    # one value of the last rank's last head
        assert combine_head_checksums(landed | reader.head_checksums(job), KV_HEADS) != expected
        for reader, _ in readers:
            reader.close()
    finally:
        prefill.close()


def test_a_layout_decode_cannot_map_is_refused_with_reason_layout(full):
    prefill = PrefillRanks(full, 3, "shm")
    try:
        reader = RankReader(pool(KV_HEADS), 0, 1, KV_HEADS, timeout_s=5)
        bad = prefill.item(tp=2, heads_per_rank=1)      # 3 heads do not split over 2 ranks
        with pytest.raises(KvTransferError) as e:
            reader.land("shm", "prefill-0", prefill.sender.source(), import_job(bad, DST_PAGES, (0, LAYERS)))
        assert e.value.reason is P.KvFailure.LAYOUT
        other = prefill.item(tp=3, heads_per_rank=2)    # another model's heads
        with pytest.raises(KvTransferError, match="layout"):
            reader.land("shm", "prefill-0", prefill.sender.source(), import_job(other, DST_PAGES, (0, LAYERS)))
    finally:
        prefill.close()


def test_decode_ranks_take_reads_whatever_the_backend_and_refuse_one_whole_pool():
    from cluster.config_types import KvTransferConfig
    from cluster.kv_transfer.hub import TpRanks, TransferHub
    hub = TransferHub(KvTransferConfig(backend="nccl"), pool(1), "decode-0", ranks=TpRanks(3, KV_HEADS))
    try:
        assert hub.receiver_for("zmq", {"ranks": 1, "servers": "tcp://127.0.0.1:1"}).name == "zmq"
        with pytest.raises(KvTransferError) as e:       # a tp=1 prefill's push of all three heads
            hub.receiver_for("nccl", {})
        assert e.value.reason is P.KvFailure.LAYOUT
    finally:
        hub.close()


def test_a_hostile_slice_request_is_answered_with_an_error_and_the_server_keeps_serving():
    import msgpack
    import zmq
    from cluster.kv_transfer.slice_server import SliceClient
    p = pool(3)
    server = SliceServer(p)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        for frames in ([msgpack.packb({"id": 1, "pages": [-1], "heads": [0, 1], "layers": [0, 1]})],
                       [msgpack.packb({"id": 2, "pages": [10 ** 6], "heads": [0, 1], "layers": [0, 1]})],
                       [msgpack.packb({"id": 3, "pages": ["0"], "heads": [0, 1], "layers": [0, 1]})],
                       [b"\xc1not msgpack"], [b"a", b"b"], [msgpack.packb([1, 2])]):
            sock.send_multipart(frames)
            assert sock.poll(READ_TIMEOUT_S * 1000), frames
            assert "error" in msgpack.unpackb(sock.recv_multipart()[0])
        client = SliceClient(timeout_s=READ_TIMEOUT_S)
        got = client.read(server.address, [0, 1], (0, 1), (0, 1))
        assert torch.equal(got, p.kv[0:1, :, 0:1].index_select(3, torch.tensor([0, 1])))
        client.close()
    finally:
        sock.close(linger=0)
        server.close()


def test_with_curve_a_slice_server_answers_only_holders_of_the_cluster_key(tmp_path):
    """As every bound socket of a cluster: its ZAP handler admits only the cluster key pair, so a
    client that knows the server's public key but not the secret is never answered."""
    import msgpack
    import zmq

    from cluster.kv_transfer.slice_server import SliceClient
    from cluster.wire.curve import CurveKeys, write_keys
    keys = write_keys(str(tmp_path / "keys"))
    p = pool(3)
    server = SliceServer(p, curve=keys)
    member = SliceClient(timeout_s=READ_TIMEOUT_S, curve=keys)
    intruder = zmq.Context.instance().socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    CurveKeys(*zmq.curve_keypair()).dial(intruder)
    intruder.setsockopt(zmq.CURVE_SERVERKEY, keys.public)
    try:
        got = member.read(server.address, [0, 1], (0, 1), (0, 1))
        assert torch.equal(got, p.kv[0:1, :, 0:1].index_select(3, torch.tensor([0, 1])))
        intruder.connect(server.address)
        intruder.send(msgpack.packb({"id": 1, "pages": [0, 1], "heads": [0, 1], "layers": [0, 1]}))
        assert not intruder.poll(1000)
    finally:
        intruder.close(linger=0)
        member.close()
        server.close()
