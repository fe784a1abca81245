"""n > 1 forks one prefilled prompt: the children share its whole pages (radix tree
references) and each owns a copy of the partial page after them; nothing leaks however
they end (finished, aborted, in any order)."""
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
FORKED = len(PROMPT) - 1             # decode forks all but the last prompt position (recomputed per child)


def prefilled(cm: CacheManager, rid: str = "r") -> Req:
    """A request whose prompt KV has arrived (pages for it and the first decode step)."""
    req = Req(rid, PROMPT, SamplingParams())
    cm.match_prefix(req)
    cm.grow(req, len(PROMPT) + 1)
    req.kv_len = len(PROMPT)
    return req


def manager(prefix_cache: bool = True, num_pages: int = 16) -> CacheManager:
    cm = CacheManager(PageAllocator(num_pages), PAGE)
    if prefix_cache:
        cm.enable_prefix_cache()
    return cm


def children(n: int) -> list[Req]:
    return [Req(f"r#{j}", PROMPT, SamplingParams()) for j in range(1, n + 1)]


def check(cm: CacheManager, live: list[Req]) -> None:
    tree = cm.tree.pages() if cm.tree is not None else []
    own = [r.page_table[r.num_shared_pages:] for r in live]
    cm.allocator.check_integrity(own + [tree])
    if cm.tree is not None:
        cm.tree.check_integrity()


def test_fork_shares_whole_pages_and_copies_the_partial_page():
    cm = manager()
    parent = prefilled(cm)
    kids = children(2)
    copies = cm.fork(parent, kids, FORKED)
    shared = parent.page_table[:2]
    assert parent.num_shared_pages == 2 and len(parent.page_table) == 3
    assert all(k.page_table[:2] == shared and k.num_shared_pages == 2 and k.kv_len == FORKED for k in kids)
    tails = [k.page_table[2] for k in kids]
    assert len({parent.page_table[2], *tails}) == 3      # each one writes its own partial page
    assert copies == [(parent.page_table[2], tails[0]), (parent.page_table[2], tails[1])]
    assert cm.allocator.num_free_pages == 16 - 2 - 3     # 2 shared + 3 partial, not 3 x 3
    check(cm, [parent, *kids])


def test_copy_on_write_keeps_children_apart():
    cm = manager()
    pool = torch.zeros(1, 2, 1, 16, PAGE, 2)
    parent = prefilled(cm)
    for i, page in enumerate(parent.page_table):
        pool[:, :, :, page] = float(i + 1)
    kids = children(1)
    src, dst = zip(*cm.fork(parent, kids, FORKED))
    copy_pages(pool, pool, list(src), list(dst))
    a, b = parent.page_table[2], kids[0].page_table[2]
    assert torch.equal(pool[:, :, :, a], pool[:, :, :, b])
    pool[:, :, :, b, 1] = -1.0                           # the child writes its position 9
    assert torch.all(pool[:, :, :, a] == 3.0)


@pytest.mark.parametrize("keep_kv", [True, False])
def test_shared_pages_go_back_when_the_last_sequence_ends(keep_kv):
    cm = manager()
    parent, kids = prefilled(cm), children(2)
    cm.fork(parent, kids, FORKED)
    shared = parent.page_table[:2]
    cm.release(parent, keep_kv=keep_kv)                  # choice 0 finishes first
    cm.release(kids[0], keep_kv=False)                   # one child aborted
    assert cm.tree.match_prefix(PROMPT)[0][:2] == shared  # the last one still reads these pages
    assert cm.token_usage > 0
    check(cm, [kids[1]])
    cm.release(kids[1], keep_kv=keep_kv)
    assert cm.token_usage == 0.0
    check(cm, [])
    cm.tree.evict(16)
    assert cm.allocator.num_free_pages == 16


def test_fork_without_prefix_cache_copies_every_page():
    cm = manager(prefix_cache=False)
    parent, kids = prefilled(cm), children(2)
    copies = cm.fork(parent, kids, FORKED)
    assert len(copies) == 6 and kids[0].num_shared_pages == 0
    check(cm, [parent, *kids])
    for r in (parent, *kids):
        cm.free(r)
    assert cm.token_usage == 0.0


def test_fork_short_of_pages_changes_nothing():
    cm = manager(num_pages=4)
    parent = prefilled(cm)
    with pytest.raises(MemoryError):
        cm.fork(parent, children(2), FORKED)             # 2 partial pages, 1 free
    assert parent.num_shared_pages == 0 and cm.allocator.num_free_pages == 1


def test_fork_of_a_parent_on_cached_pages_keeps_references_balanced():
    cm = manager()
    first = prefilled(cm, "first")
    first.output_ids.append(7)
    first.kv_len += 1
    cm.release(first)                                    # its 2 whole pages are now cached
    parent = prefilled(cm)
    assert parent.num_shared_pages == 2
    kids = children(3)
    cm.fork(parent, kids, 5)                             # fewer tokens than the parent holds cached
    assert all(k.num_shared_pages == 1 and k.cache_node.depth == 1 for k in kids)
    check(cm, [parent, *kids])
    for r in (*kids, parent):
        cm.release(r, keep_kv=False)
    assert cm.token_usage == 0.0
    check(cm, [])
