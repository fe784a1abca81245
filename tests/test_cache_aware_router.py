"""The router's cache_aware policy: prefixes it dispatched pull requests back, load wins
beyond the balance threshold, and every choice is logged."""
import logging

from cluster.router.prefix_index import PrefixIndex
from cluster.router.worker_directory import BALANCE_THRESHOLD, WorkerDirectory, WorkerInfo

SYSTEM = list(range(100, 148))          # a 48-token shared system prompt: 3 pages of 16


def directory() -> WorkerDirectory:
    d = WorkerDirectory("cache_aware")
    for i in range(2):
        d.add(WorkerInfo(f"prefill-{i}", "prefill", "m", {"num_pages": 64, "page_size": 16}, {}, "", 0))
    return d


def test_prefix_index_matches_whole_pages_and_forgets_least_recently_used():
    index = PrefixIndex()
    index.add_worker("w", page_size=4, num_pages=3)
    index.insert("w", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert index.match("w", [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8
    assert index.match("w", [1, 2, 3, 0]) == 0 and index.match("w", [1, 2, 3]) == 0
    index.insert("w", [9, 9, 9, 9, 8, 8, 8, 8])          # 4 pages in a pool of 3: the oldest goes
    assert index.match("w", [1, 2, 3, 4]) == 0 and index.match("w", [9, 9, 9, 9, 8, 8, 8, 8]) == 8
    assert index.match("unknown", [1, 2, 3, 4]) == 0


def test_cache_aware_sends_a_conversation_back_to_the_worker_holding_its_prefix(caplog):
    d = directory()
    conversations = [SYSTEM + [i] * 40 for i in range(6)]
    with caplog.at_level(logging.INFO, logger="pdcluster.router"):
        first = {}
        for i, ids in enumerate(conversations):
            w = d.pick("prefill", token_ids=ids, rid=f"c{i}-t1")
            first[i] = w.worker_id
            w.num_inflight += 1                            # keep loads honest, as the dispatcher does
        for i, ids in enumerate(conversations):            # turn 2 appends to turn 1
            w = d.pick("prefill", token_ids=ids + [7] * 30, rid=f"c{i}-t2")
            assert w.worker_id == first[i]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache_aware:")]
    assert len(lines) == 12
    assert any("c3-t2 -> " + first[3] + " (longest cached prefix; cached 80/" in line for line in lines)


def test_cache_aware_falls_back_to_least_load_when_imbalanced(caplog):
    d = directory()
    w0, w1 = d.workers["prefill-0"], d.workers["prefill-1"]
    d.prefixes.insert("prefill-0", SYSTEM)
    assert d.pick("prefill", token_ids=SYSTEM + [1], rid="a") is w0
    w0.num_inflight = BALANCE_THRESHOLD + 1
    with caplog.at_level(logging.INFO, logger="pdcluster.router"):
        assert d.pick("prefill", token_ids=SYSTEM + [2], rid="b") is w1
    assert "b -> prefill-1 (imbalanced loads" in caplog.text
    d.remove("prefill-0")
    assert d.pick("prefill", token_ids=SYSTEM, rid="c") is w1 and d.prefixes.match("prefill-0", SYSTEM) == 0


def test_decode_counts_a_prefix_as_cached_only_once_a_request_finished_there():
    d = WorkerDirectory("cache_aware")
    d.add(WorkerInfo("decode-0", "decode", "m", {"num_pages": 64, "page_size": 16}, {}, "", 0))
    d.pick("decode", token_ids=SYSTEM, rid="a")
    assert d.prefixes.match("decode-0", SYSTEM) == 0        # dispatched, KV not kept yet
    d.record_finished("decode-0", SYSTEM + [1] * 20)
    assert d.prefixes.match("decode-0", SYSTEM + [1] * 20) == 64
