"""n > 1 forks one prefilled prompt: the children share its whole pages (radix tree
references) and each owns a copy of the last partial page; nothing leaks however they end."""
from __future__ import annotations

import pytest
import torch

from cluster.engine.page_allocator import PageAllocator
from cluster.kv_transfer.page_copy import copy_pages
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams

PAGE = 4
PROMPT = list(range(100, 110))       # 10 tokens: 2 whole pages and a partial one


def prefilled(cm: CacheManager, rid: str = "r") -> Req:
    req = Req(rid, PROMPT, SamplingParams())
    cm.grow(req, len(PROMPT))
    req.kv_len = len(PROMPT)
    req.output_ids.append(7)         # the first token, sampled by the prefill
    return req


def manager(prefix_cache: bool = True, num_pages: int = 16) -> CacheManager:
    cm = CacheManager(PageAllocator(num_pages), PAGE)
    if prefix_cache:
        cm.enable_prefix_cache()
    return cm


def children(n: int) -> list[Req]:
    return [Req(f"r#{j}", PROMPT, SamplingParams(), output_ids=[7]) for j in range(n)]


def check(cm: CacheManager, live: list[Req]) -> None:
    tree = cm.tree.pages() if cm.tree is not None else []
    own = [r.page_table[r.num_shared_pages:] for r in live]
    cm.allocator.check_integrity(own + [tree])
    if cm.tree is not None:
        cm.tree.check_integrity()


def test_fork_shares_whole_pages_and_copies_the_partial_page():
    cm = manager()
    parent = prefilled(cm)
    kids = children(3)
    copies = cm.fork(parent, kids)
    assert parent.page_table == [] and parent.cache_node is None
    shared = kids[0].page_table[:2]
    assert all(k.page_table[:2] == shared and k.num_shared_pages == 2 and k.kv_len == 10 for k in kids)
    tails = [k.page_table[2] for k in kids]
    assert len(set(tails)) == 3                          # each child writes its own partial page
    assert copies == [(tails[0], tails[1]), (tails[0], tails[2])]
    assert cm.allocator.num_free_pages == 16 - 2 - 3     # 2 shared + 3 partial, not 3 x 3
    check(cm, kids)


def test_copy_on_write_keeps_children_apart():
    cm = manager()
    pool = torch.zeros(1, 2, 1, 16, PAGE, 2)
    parent = prefilled(cm)
    for i, page in enumerate(parent.page_table):
        pool[:, :, :, page] = float(i + 1)
    kids = children(2)
    src, dst = zip(*cm.fork(parent, kids))
    copy_pages(pool, pool, list(src), list(dst))
    a, b = kids[0].page_table[2], kids[1].page_table[2]
    assert torch.equal(pool[:, :, :, a], pool[:, :, :, b])
    pool[:, :, :, b, 2] = -1.0                           # child 1 writes its next token's KV
    assert torch.all(pool[:, :, :, a] == 3.0)


@pytest.mark.parametrize("keep_kv", [True, False])
def test_shared_pages_go_back_when_the_last_child_ends(keep_kv):
    cm = manager()
    kids = children(3)
    cm.fork(prefilled(cm), kids)
    shared = kids[0].page_table[:2]
    cm.release(kids[1], keep_kv=False)                   # one child aborted
    assert cm.tree.match_prefix(PROMPT)[0] == shared     # the others still read these pages
    assert cm.token_usage > 0
    check(cm, [kids[0], kids[2]])
    cm.release(kids[0], keep_kv=keep_kv)
    cm.release(kids[2], keep_kv=keep_kv)
    assert cm.token_usage == 0.0
    check(cm, [])
    cm.tree.evict(16)
    assert cm.allocator.num_free_pages == 16


def test_fork_without_prefix_cache_copies_every_page():
    cm = manager(prefix_cache=False)
    kids = children(2)
    copies = cm.fork(prefilled(cm), kids)
    assert len(copies) == 3 and kids[0].num_shared_pages == 0
    check(cm, kids)
    for k in kids:
        cm.free(k)
    assert cm.token_usage == 0.0


def test_fork_short_of_pages_changes_nothing():
    cm = manager(num_pages=4)
    parent = prefilled(cm)
    with pytest.raises(MemoryError):
        cm.fork(parent, children(3))                     # 2 more partial pages, 1 free
    assert len(parent.page_table) == 3 and cm.allocator.num_free_pages == 1


def test_fork_of_a_parent_on_cached_pages_keeps_references_balanced():
    cm = manager()
    first = prefilled(cm, "first")
    cm.release(first)                                    # its 2 whole pages are now cached
    parent = Req("r", PROMPT, SamplingParams())
    assert cm.match_prefix(parent) == 8
    cm.grow(parent, len(PROMPT))
    parent.kv_len = len(PROMPT)
    kids = children(2)
    cm.fork(parent, kids)
    check(cm, kids)
    for k in kids:
        cm.release(k, keep_kv=False)
    assert cm.token_usage == 0.0
    check(cm, [])
