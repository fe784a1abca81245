"""Layer-wise KV streaming (kv_transfer/layerwise.py, decode_worker/layer_landing.py): with a real
(tiny, random) Llama forward, each layer of a planned request leaves in its own kv_layers
message before the forward has finished, through the real codec; landed on a decode pool layer
by layer it is exactly the request's KV, and the kv_batch item then moves no bytes."""
import threading
import time

import torch

from cluster.engine.attention_context import AttentionContext
from cluster.engine.kv_cache import KVPool
from cluster.engine.model import LlamaModel
from cluster.engine.model_config import ModelConfig
import pytest

from cluster.kv_transfer import KvTransferError
from cluster.kv_transfer.checksum import xxh3_tensor
from cluster.kv_transfer.layerwise import LayerStream, Planned
from cluster.kv_transfer.shm_backend import ShmReceiver, ShmSender, shared_pool_storage
from cluster.kv_transfer.zmq_backend import ZmqReceiver, ZmqSender
from cluster.wire import protocol as P
from decode_worker.layer_landing import LayerLanding

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4,
                  num_kv_heads=2, head_dim=8)
PAGE, LENGTH, PAGES = 4, 10, [5, 2, 9]


HANDSHAKE_TIMEOUT_S = 30.0     # bounds a hang only: a streamer that keeps up releases each layer at once


class SlowLayer(torch.nn.Module):
    """A decoder layer that takes a while and starts only once the layers before it have left the
    wire, so staging overlaps the later layers by construction rather than by the streamer thread
    winning a 50 ms race on loaded cores; a stream that sent at the forward's end would leave every
    layer waiting out the timeout (`wire.late`)."""

    def __init__(self, layer, index: int, wire: "Wire"):
        super().__init__()
        self.layer, self.index, self.wire = layer, index, wire

    def forward(self, *args):
        if not self.wire.wait_sent(self.index, HANDSHAKE_TIMEOUT_S):
            self.wire.late.append(self.index)
        time.sleep(0.05)
        return self.layer(*args)


def forward(model, pool):
    ctx = AttentionContext.build([LENGTH], [0], [PAGES], [0], PAGE, False, "cpu")
    ids = torch.arange(LENGTH) % CFG.vocab_size
    with torch.inference_mode():
        model(ids, ctx.positions, pool.layer_caches(), ctx)
    return time.perf_counter()


class Wire:
    """The prefill's send: every message through the real codec, timed when it left."""

    def __init__(self):
        self.sent: list[tuple[str, P.KvLayers, float]] = []
        self.late: list[int] = []           # layers that waited in vain for the ones before them
        self._sent = threading.Condition()

    def __call__(self, peer: str, msg: P.KvLayers) -> None:
        with self._sent:
            self.sent.append((peer, P.decode([bytes(f) for f in P.encode(msg)]), time.perf_counter()))
            self._sent.notify_all()

    def wait_sent(self, num_layers: int, timeout_s: float) -> bool:
        with self._sent:
            return self._sent.wait_for(lambda: len(self.sent) >= num_layers, timeout_s)


def planned(backend, rid="r1", attempt=0) -> Planned:
    span = P.KvSpan(rid, LENGTH, attempt=attempt, src_pages=PAGES if backend.holds_pages else None)
    return Planned(backend, PAGES, LENGTH, "tcp://127.0.0.1:9", span)


def land(msgs, backend, decode_pool, dst_pages, num_layers):
    """What the decode scheduler does with the kv_layers messages of one request."""
    landing = LayerLanding()
    for _, msg, _ in msgs:
        span = msg.reqs[0]
        landing.expect(span.rid, span.attempt, msg.layer)
        payload = msg.tensors[0] if msg.tensors else None
        num_bytes = backend.unpack("prefill-0", msg.source, span, payload, dst_pages,
                                   (msg.layer, msg.layer + msg.num_layers))
        landing.landed(span.rid, msg.num_layers, num_bytes)
    assert landing.take("r1", 0, num_layers) == decode_pool.request_bytes(LENGTH)   # the layers add up to the whole


def test_each_layer_leaves_before_the_forward_finishes_and_lands_as_the_pool_holds_it():
    torch.manual_seed(0)
    model = LlamaModel(CFG)
    wire = Wire()
    model.layers = torch.nn.ModuleList(SlowLayer(layer, i, wire) for i, layer in enumerate(model.layers))
    pool = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 16, PAGE)
    stream, zmq = LayerStream(CFG.num_layers, pool.device, "prefill-0", wire), ZmqSender(pool, "prefill-0", verify=True)
    model.add_layer_listener(stream.on_layer)
    try:
        stream.plan(6, [planned(zmq, rid="stale")])          # its forward failed before it ran
        stream.plan(7, [planned(zmq)])
        stream.launching(7)
        done = forward(model, pool)
        packed, sent_at = stream.finish("r1")
        assert [m.layer for _, m, _ in wire.sent] == list(range(CFG.num_layers)) and wire.late == []
        assert all(m.forward_iter == 7 and m.reqs[0].rid == "r1" for _, m, _ in wire.sent)
        assert all(t < done for _, _, t in wire.sent[:-1])   # layers 0..n-2 left while later ones ran
        assert wire.sent[0][2] < wire.sent[-2][2] - 0.1      # ... spread over the forward, not at its end
        whole = pool.export_kv(PAGES, LENGTH)
        for i, (_, msg, _) in enumerate(wire.sent):
            assert torch.equal(msg.tensors[0].tensor(), whole[i:i + 1])
        assert packed.layers_sent == CFG.num_layers and packed.tensor.numel() == 0   # nothing left to move
        assert packed.checksum == xxh3_tensor(whole)         # the checksum covers every layer
        assert stream.finish("r1") is None and stream.finish("stale") is None   # consumed once; dropped

        decode = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 8, PAGE)
        receiver = ZmqReceiver(decode, "decode-0", verify=True)
        land(wire.sent, receiver, decode, [6, 0, 3], CFG.num_layers)
        item = P.KvReq("r1", 1, LENGTH, checksum=packed.checksum, layers_sent=packed.layers_sent)
        receiver.verify_landed(item, [6, 0, 3])
        assert torch.equal(decode.export_kv([6, 0, 3], LENGTH), whole)
        decode.kv[2, 1, 0, 3] += 1                           # a flipped value in the last page
        with pytest.raises(KvTransferError, match="checksum"):
            receiver.verify_landed(item, [6, 0, 3])
    finally:
        stream.close()


def test_in_place_backends_send_each_layer_as_a_message_and_decode_copies_it_from_the_segment():
    storage, seg = shared_pool_storage((CFG.num_layers, 2, CFG.num_kv_heads, 16, PAGE, CFG.head_dim), torch.float32)
    model = LlamaModel(CFG)
    pool = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 16, PAGE, storage=storage)
    wire = Wire()
    stream, shm = LayerStream(CFG.num_layers, pool.device, "prefill-0", wire), ShmSender(pool, "prefill-0", True, segment=seg)
    model.add_layer_listener(stream.on_layer)
    try:
        stream.plan(1, [])                                   # a forward that completes no prompt
        stream.plan(2, [planned(shm)])
        stream.launching(1)
        forward(model, pool)
        assert wire.sent == [] and stream.finish("r1") is None
        stream.launching(2)
        forward(model, pool)
        packed, _ = stream.finish("r1")
        assert len(wire.sent) == CFG.num_layers and all(not m.tensors and m.reqs[0].src_pages == PAGES
                                                        for _, m, _ in wire.sent)
        assert packed.tensor is None and packed.src_pages == PAGES and packed.layers_sent == CFG.num_layers
        decode = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 8, PAGE)
        receiver = ShmReceiver(decode, "decode-0", verify=True)
        land(wire.sent, receiver, decode, [1, 2, 7], CFG.num_layers)
        receiver.verify_landed(P.KvReq("r1", 1, LENGTH, checksum=packed.checksum), [1, 2, 7])
        assert torch.equal(decode.export_kv([1, 2, 7], LENGTH), pool.export_kv(PAGES, LENGTH))
    finally:
        stream.close()
        seg.close()


def test_landing_takes_exactly_the_layers_sent_ahead_in_order_per_attempt():
    landing = LayerLanding()
    landing.expect("r", 0, 0)
    landing.landed("r", 1, 100)
    with pytest.raises(KvTransferError, match="layers"):
        landing.expect("r", 0, 2)                            # layer 1 never came
    with pytest.raises(KvTransferError, match="1 of the 3"):
        landing.take("r", 0, 3)
    landing.expect("r", 0, 0)
    landing.landed("r", 1, 100)
    landing.expect("r", 1, 0)                                # a newer attempt starts over
    landing.landed("r", 2, 300)
    assert landing.take("r", 1, 2) == 300                    # its bytes alone
    landing.failed("q", 0, KvTransferError("unreachable", "no mapping"))
    with pytest.raises(KvTransferError, match="unreachable"):
        landing.take("q", 0, 3)
    assert len(landing) == 0
