"""The KV head map between tensor-parallel sizes: every decode rank reads exactly its own heads,
each once, from prefill ranks that hold them; layouts that do not split are refused."""
import itertools

import pytest

from cluster.engine.model_config import PRESETS
from cluster.engine.parallel import TpLayout
from cluster.kv_transfer.head_map import HeadPiece, HeadSplit, LayoutError, head_pieces

KV_HEADS = (1, 2, 3, 4, 8)
SIZES = range(1, 9)


def splits(kv: int):
    for tp in SIZES:
        try:
            yield HeadSplit(kv, tp)
        except LayoutError:
            pass


@pytest.mark.parametrize("kv", KV_HEADS)
def test_every_pair_of_sizes_gives_each_decode_rank_exactly_its_heads(kv):
    for src, dst in itertools.product(list(splits(kv)), repeat=2):
        for rank in range(dst.tp):
            got = {}
            for p in head_pieces(src, dst, rank):
                assert 0 <= p.src_head and p.src_head + p.count <= src.heads_per_rank
                for i in range(p.count):
                    head = src.first_head(p.src_rank) + p.src_head + i   # the model's head id
                    assert p.dst_head + i not in got, (src, dst, rank)
                    got[p.dst_head + i] = head
            want = {i: dst.first_head(rank) + i for i in range(dst.heads_per_rank)}
            assert got == want, (src, dst, rank)


def test_default_model_pairs_one_and_three():
    """SmolLM2-135M: 3 KV heads. P tp=1 -> D tp=3: each decode rank reads its head from the one
    prefill rank; P tp=3 -> D tp=1: the decode rank reads one head from each prefill rank."""
    one, three = HeadSplit(3, 1), HeadSplit(3, 3)
    assert [head_pieces(one, three, r) for r in range(3)] == [[HeadPiece(0, r, 0, 1)] for r in range(3)]
    assert head_pieces(three, one, 0) == [HeadPiece(r, 0, r, 1) for r in range(3)]
    assert head_pieces(three, three, 2) == [HeadPiece(2, 0, 0, 1)]
    assert head_pieces(one, one, 0) == [HeadPiece(0, 0, 0, 3)]


def test_replicated_heads_are_read_from_spread_replicas():
    """2 KV heads over 4 prefill ranks (each held twice) to 4 decode ranks: ranks 0 and 1 want
    head 0 and read it from different replicas."""
    src, dst = HeadSplit(2, 4), HeadSplit(2, 4)
    assert [head_pieces(src, dst, r)[0].src_rank for r in range(4)] == [0, 1, 2, 3]
    assert [p.src_rank for p in head_pieces(HeadSplit(2, 4), HeadSplit(2, 1), 0)] == [0, 2]


def test_the_map_agrees_with_the_engine_split():
    """HeadSplit's rule is the one engine/parallel.TpLayout shards k/v with."""
    cfg = PRESETS["tiny-llama"]
    for tp in (1, 2, 4):
        split = HeadSplit(cfg.num_kv_heads, tp)
        for rank in range(tp):
            layout = TpLayout(cfg, tp, rank)
            assert (layout.kv_head_start, layout.num_kv_heads) == (split.first_head(rank), split.heads_per_rank)


@pytest.mark.parametrize("kv,tp,per_rank", [(3, 2, 1), (3, 1, 1), (2, 4, 2), (3, 3, 3)])
def test_a_layout_that_does_not_split_is_refused(kv, tp, per_rank):
    with pytest.raises(LayoutError):
        HeadSplit.of_rank(kv, tp, per_rank)


def test_heads_of_another_model_are_refused():
    with pytest.raises(LayoutError, match="4 KV heads sent"):
        head_pieces(HeadSplit(4, 2), HeadSplit(2, 1), 0)
