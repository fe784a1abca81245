"""Layer-wise KV staging (kv_transfer/layerwise.py): with a real (tiny, random) Llama forward,
each layer of a planned request is staged by the transfer backend before the forward has
finished, and what is staged is exactly the request's KV in handoff layout."""
import time

import torch

from cluster.engine.attention_context import AttentionContext
from cluster.engine.kv_cache import KVPool
from cluster.engine.model import LlamaModel
from cluster.engine.model_config import ModelConfig
from cluster.kv_transfer.layerwise import LayerStream
from cluster.kv_transfer.shm_backend import ShmTransfer
from cluster.kv_transfer.zmq_backend import ZmqTransfer
from cluster.kv_transfer.checksum import xxh3_tensor

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=4,
                  num_kv_heads=2, head_dim=8)
PAGE, LENGTH, PAGES = 4, 10, [5, 2, 9]


class SlowLayer(torch.nn.Module):
    """A decoder layer that takes a while, so staging can be seen to overlap later layers."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        time.sleep(0.05)
        return self.layer(*args)


def forward(model, pool):
    ctx = AttentionContext.build([LENGTH], [0], [PAGES], [0], PAGE, False, "cpu")
    ids = torch.arange(LENGTH) % CFG.vocab_size
    with torch.inference_mode():
        model(ids, ctx.positions, pool.layer_caches(), ctx)
    return time.perf_counter()


def test_each_layer_is_staged_before_the_forward_finishes_and_matches_the_pool():
    torch.manual_seed(0)
    model = LlamaModel(CFG)
    model.layers = torch.nn.ModuleList(SlowLayer(layer) for layer in model.layers)
    pool = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 16, PAGE)
    stream, zmq = LayerStream(model, pool.device), ZmqTransfer(pool, "prefill-0", verify=True)
    try:
        stream.plan([("r1", zmq, PAGES, LENGTH)])
        done = forward(model, pool)
        packed, staged_at = stream.finish("r1")
        assert len(staged_at) == CFG.num_layers
        assert all(t < done for t in staged_at[:-1])       # layers 0..n-2 staged while later ones ran
        assert staged_at[0] < staged_at[-2] - 0.1            # ... spread over the forward, not at its end
        whole = pool.export_kv(PAGES, LENGTH)
        assert torch.equal(packed.tensor, whole)
        assert packed.checksum == xxh3_tensor(whole)         # the checksum covers every layer
        assert stream.finish("r1") is None                   # consumed once
    finally:
        stream.close()


def test_an_unplanned_forward_stages_nothing_and_in_place_backends_pack_after_it():
    model = LlamaModel(CFG)
    pool = KVPool(CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, 16, PAGE)
    stream, shm = LayerStream(model, pool.device), ShmTransfer(pool, "prefill-0", verify=False)
    try:
        stream.plan([])                                      # a forward that completes no prompt
        stream.plan([("r2", shm, PAGES, LENGTH)])
        forward(model, pool)
        assert stream.finish("r2") is None
        forward(model, pool)
        packed, _ = stream.finish("r2")
        assert packed.tensor is None and packed.src_pages == PAGES    # decode reads the pages in place
    finally:
        stream.close()
