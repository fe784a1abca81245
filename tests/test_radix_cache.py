"""RadixCache against a plain model (a dict of cached prefixes), under random traffic."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.engine.page_allocator import PageAllocator
from cluster.engine.radix_cache import RadixCache

PAGE = 2
NUM_PAGES = 12


class PrefixModel:
    """Cached prefixes as a dict `token prefix -> [page, ref_count, last_used]`."""

    def __init__(self):
        self.entries: dict[tuple, list] = {}
        self.clock = 0

    def _prefixes(self, ids: tuple, k: int):
        return [ids[:j * PAGE] for j in range(1, k + 1)]

    def touch(self, ids: tuple, k: int) -> None:
        self.clock += 1
        for p in self._prefixes(ids, k):
            self.entries[p][2] = self.clock

    def match(self, ids: tuple) -> int:
        k = 0
        while (k + 1) * PAGE <= len(ids) and ids[:(k + 1) * PAGE] in self.entries:
            k += 1
        self.touch(ids, k)
        return k

    def lock(self, ids: tuple, k: int, delta: int) -> None:
        for p in self._prefixes(ids, k):
            self.entries[p][1] += delta

    def insert(self, ids: tuple, pages: list) -> None:
        n = min(len(ids) // PAGE, len(pages))
        for j, p in enumerate(self._prefixes(ids, n)):
            self.entries.setdefault(p, [pages[j], 0, 0])
        self.touch(ids, n)

    def evictable(self) -> int:
        return sum(e[1] == 0 for e in self.entries.values())

    def evict(self, num: int) -> int:
        freed = 0
        while freed < num:
            leaves = [p for p, e in self.entries.items() if e[1] == 0 and not any(
                len(q) == len(p) + PAGE and q[:len(p)] == p for q in self.entries)]
            if not leaves:
                break
            del self.entries[min(leaves, key=lambda p: self.entries[p][2])]
            freed += 1
        return freed


def tree_prefixes(cache: RadixCache) -> dict[tuple, tuple[int, int]]:
    out = {}
    stack = [((), n) for n in cache.root.children.values()]
    while stack:
        prefix, node = stack.pop()
        key = prefix + node.key
        out[key] = (node.page, node.ref_count)
        stack += [(key, c) for c in node.children.values()]
    return out


seqs = st.lists(st.integers(0, 1), min_size=0, max_size=9).map(tuple)
ops = st.one_of(
    st.tuples(st.just("request"), seqs, st.booleans()),   # match, lock, extend, insert; keep it live?
    st.tuples(st.just("duplicate"), seqs, st.just(False)), # insert freshly computed pages for all of it
    st.tuples(st.just("finish"), st.integers(0, 7), st.just(False)),
    st.tuples(st.just("evict"), st.integers(0, 6), st.just(False)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40))
def test_radix_cache_matches_prefix_model(program):
    alloc = PageAllocator(NUM_PAGES)
    cache, model = RadixCache(alloc, PAGE), PrefixModel()
    live: list[tuple[object, tuple, int]] = []     # (node, ids, pages) a live request holds locked
    for op, arg, keep in program:
        if op == "request":
            pages, node = cache.match_prefix(arg)
            k = model.match(arg)
            assert len(pages) == k
            cache.lock(node)
            model.lock(arg, k, +1)
            need = len(arg) // PAGE - k
            if need > alloc.num_free_pages + cache.num_evictable_pages:
                cache.unlock(node)
                model.lock(arg, k, -1)
                continue
            model.evict(need - alloc.num_free_pages)
            new = cache.allocate(need)
            cache.insert(arg, pages + new)
            model.insert(arg, pages + new)
            cache.unlock(node)
            model.lock(arg, k, -1)
            if keep:                               # the request still runs on the whole prefix
                pages, node = cache.match_prefix(arg)
                k = model.match(arg)
                cache.lock(node)
                model.lock(arg, k, +1)
                live.append((node, arg, k))
        elif op == "duplicate":
            n = len(arg) // PAGE
            if n > alloc.num_free_pages + cache.num_evictable_pages:
                continue
            model.evict(n - alloc.num_free_pages)
            fresh = cache.allocate(n)
            cache.insert(arg, fresh)
            model.insert(arg, fresh)
        elif op == "finish" and live:
            node, ids, k = live.pop(arg % len(live))
            cache.unlock(node)
            model.lock(ids, k, -1)
        elif op == "evict":
            assert cache.evict(arg) == model.evict(arg)
        cache.check_integrity()
        alloc.check_integrity(held=[cache.pages()])
        assert cache.num_evictable_pages == model.evictable()
        assert tree_prefixes(cache) == {p: (e[0], e[1]) for p, e in model.entries.items()}
        for node, ids, k in live:                  # a live request's prefix is never evicted
            assert cache.match_prefix(ids)[0] == [model.entries[ids[:j * PAGE]][0] for j in range(1, k + 1)]
            model.match(ids)


def test_eviction_frees_least_recently_used_leaf_first():
    alloc = PageAllocator(4)
    cache = RadixCache(alloc, PAGE)
    cache.insert((1, 1, 2, 2), alloc.allocate(2))
    cache.insert((3, 3), alloc.allocate(1))
    cache.match_prefix((1, 1, 2, 2))              # now (3, 3) is the oldest
    assert cache.evict(1) == 1
    assert cache.match_prefix((3, 3))[0] == [] and len(cache.match_prefix((1, 1, 2, 2))[0]) == 2
    _, node = cache.match_prefix((1, 1))
    cache.lock(node)
    assert cache.evict(5) == 1                    # only (2, 2) is free to go; (1, 1) is referenced
    assert cache.num_cached_pages == 1 and alloc.num_free_pages == 3
    cache.unlock(node)
    assert cache.allocate(4) and cache.num_cached_pages == 0
