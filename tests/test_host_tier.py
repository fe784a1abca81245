"""The host tier of the prefix cache, without a model: a CacheManager over a real (tiny, CPU)
KV pool and host tier whose pages hold a value per cached prefix, under random traffic of
requests that finish, abort, are retracted and re-prefilled, and workers that die."""
from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams
from tests.host_tier_harness import PAGE, check, check_shared_pages, compute, manager

CONVERSATIONS = [(0, 0, 1, 1, 2, 2, 0, 1, 2), (0, 0, 1, 1, 0, 0, 2, 2, 1), (2, 1, 0, 2, 1, 0, 2, 1, 0),
                 (1, 1, 1, 1, 1, 1, 1, 1, 1)]
seqs = st.one_of(st.lists(st.integers(0, 1), min_size=3, max_size=9).map(tuple),   # turns of a few
                 st.tuples(st.sampled_from(CONVERSATIONS), st.integers(3, 9)).map(lambda c: c[0][:c[1]]))
request = st.tuples(st.just("request"), seqs, st.sampled_from([False, False, True]))  # keep it live?
ops = st.one_of(
    request, request, request,
    st.tuples(st.just("finish"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 7)),
    st.tuples(st.just("retract"), st.integers(0, 7)),      # pages back (kept), prefilled again
    st.tuples(st.just("death"),),                          # the peer died: every live request aborted
    st.tuples(st.just("evict_host"), st.integers(0, 5)),
    st.tuples(st.just("recompute_is_cheaper"), st.booleans()).filter(lambda op: not op[1]),
    st.tuples(st.just("recompute_is_cheaper"), st.booleans()),
)


def run_program(program, host_pages: int, exact: bool) -> None:
    cm, model, live, n = manager(host_pages=host_pages, adaptive=not exact), set(), [], 0

    def request(ids: tuple, keep_live: bool) -> None:
        nonlocal n
        n += 1
        req = Req(f"r{n}", list(ids), SamplingParams())
        pages, node = cm.tree.match_prefix(ids[:-1])
        cm.tree.lock(node)                     # as match_prefix does before it loads
        device_k, free = len(pages), cm.num_free_pages
        cm.tree.unlock(node)
        model_k = max((j for j in range(len(ids) // PAGE + 1) if (len(ids) - 1) // PAGE >= j
                       and all(ids[:i * PAGE] in model for i in range(1, j + 1))), default=0)
        loads = cm.host_tier.cost.should_load(PAGE)
        cm.match_prefix(req)
        if exact:   # a host tier that never runs out: all it was given comes back, as far as pages fit
            assert req.num_shared_pages == (min(model_k, device_k + free) if loads else device_k), \
                (req.num_shared_pages, model_k, device_k, free)
        check_shared_pages(cm, req)
        if not cm.can_grow(req, req.seq_len):
            cm.unmatch(req)
            return
        cm.grow(req, req.seq_len)
        compute(cm, req)
        if keep_live:
            live.append(req)
        else:
            finish(req)

    def finish(req: Req) -> None:
        model.update(tuple(req.all_ids[:j * PAGE]) for j in range(1, req.seq_len // PAGE + 1))
        cm.release(req, keep_kv=True)

    for op, *args in program:
        if op == "request":
            request(*args)
        elif op in ("finish", "abort", "retract") and live:
            req = live.pop(args[0] % len(live))
            if op == "abort":
                cm.release(req, keep_kv=False)
            else:
                finish(req)
            if op == "retract":
                request(tuple(req.all_ids), True)
        elif op == "death":
            while live:
                cm.release(live.pop(), keep_kv=False)
        elif op == "evict_host" and not exact:
            cm.tree.evict_host(args[0])
        elif op == "recompute_is_cheaper":
            cm.host_tier.cost.prefill_tokens_per_s = 1e30 if args[0] else None
        check(cm, live)
    while live:
        cm.release(live.pop(), keep_kv=True)
    check(cm, live)


@settings(max_examples=250, deadline=None)
@given(st.lists(ops, min_size=10, max_size=40))
def test_tiers_give_back_every_prefix_a_large_host_tier_was_given(program):
    run_program(program, host_pages=512, exact=True)


@settings(max_examples=250, deadline=None)
@given(st.lists(ops, min_size=10, max_size=40))
def test_tiers_stay_consistent_when_the_host_tier_runs_out(program):
    run_program(program, host_pages=3, exact=False)


def test_tiers_stay_consistent_under_long_seeded_random_traffic():
    """Longer programs than hypothesis tends to draw, so the host tier fills, serves hits and evicts."""
    rng = random.Random(7)
    kinds = ["request"] * 6 + ["finish", "retract", "abort", "evict_host", "death"]
    for _ in range(60):
        program = []
        for _ in range(40):
            kind = rng.choice(kinds)
            if kind == "request":
                ids = rng.choice(CONVERSATIONS)[:rng.randint(3, 9)] if rng.random() < 0.5 else \
                    tuple(rng.randint(0, 1) for _ in range(rng.randint(1, 9)))
                program.append((kind, ids, rng.random() < 0.3))
            else:
                program.append((kind,) if kind == "death" else (kind, rng.randint(0, 7)))
        run_program(program, host_pages=512, exact=True)
        run_program(program, host_pages=3, exact=False)
