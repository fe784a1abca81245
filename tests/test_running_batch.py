"""The persistent decode batch: after any sequence of admissions, decode steps (with page growth and
retraction), finishes, aborts and processed results, its incrementally kept rows equal rows built
from scratch from the requests."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cluster.engine.attention_context import AttentionContext
from cluster.engine.page_allocator import PageAllocator
from cluster.runtime.batch_builder import build_forward_input
from cluster.runtime.cache_manager import CacheManager
from cluster.runtime.decode_manager import DecodeManager
from cluster.runtime.output_processor import OutputProcessor
from cluster.runtime.schedule_batch import Req
from cluster.sampling_params import SamplingParams

PAGE_SIZE = 4
EOS = frozenset({0})
OPS = ("admit", "launch", "process", "finish", "abort")


class Sim:
    """A decode manager over a small page pool, a fake forward writing a future map, and results
    processed up to two steps late (overlap)."""

    def __init__(self, num_pages: int, prefix_cache: bool):
        self.cache = CacheManager(PageAllocator(num_pages), PAGE_SIZE)
        if prefix_cache:
            self.cache.enable_prefix_cache()
        self.waiting: list[Req] = []        # retracted, to be prefilled again
        self.dm = DecodeManager(self.cache, on_retract=self.waiting.append, on_fail=self.release)
        self.future = {}                    # slot -> token the last forward stored
        self.in_flight = []                 # (reqs, tokens) launched, not processed
        self.next_rid = 0
        self.emitted = {}
        self.out = OutputProcessor(None, self.emit, self.release, self.emit_plain)

    def emit(self, req, tokens, reason, *rest, **kw):
        self.emitted.setdefault(req.rid, []).extend(tokens)

    def emit_plain(self, rids, tokens):
        for rid, t in zip(rids, tokens):
            self.emitted.setdefault(rid, []).append(t)

    def release(self, req, reason=None):
        if reason is not None:
            req.finish_reason, req.error = "abort", reason
        self.dm.remove(req)
        self.cache.release(req, keep_kv=req.error is None and req.finish_reason != "abort")

    def prefill(self, req: Req) -> bool:
        if not self.cache.can_grow(req, req.seq_len):
            return False
        self.cache.grow(req, req.seq_len)
        req.kv_len = req.seq_len
        req.num_pending += 1
        self.future[req.future_slot] = 100 + req.seq_len   # the prefill forward's token
        self.in_flight.append(("prefill", [req], [100 + req.seq_len]))
        self.dm.add(req)
        return True

    def admit(self, data) -> None:
        if self.waiting and all(r.num_pending == 0 for r in self.waiting[:1]):
            if self.prefill(self.waiting[0]):
                self.waiting.pop(0)
            return
        rid = f"r{self.next_rid}"
        self.next_rid += 1
        max_tokens = data.draw(st.integers(1, 12))
        sp = SamplingParams(max_tokens=max_tokens, min_tokens=data.draw(st.integers(0, max_tokens)),
                            ignore_eos=data.draw(st.booleans()),
                            seed=data.draw(st.one_of(st.none(), st.integers(0, 9))))
        req = Req(rid, list(range(1, data.draw(st.integers(1, 9)) + 1)), sp, eos_token_ids=EOS)
        req.future_slot = self.next_rid
        self.prefill(req)

    def launch(self, data) -> None:
        batch = self.dm.schedule()
        if batch is None:
            return
        fi = build_forward_input(batch)
        for i, slot in enumerate(fi.future_slots):
            ids = fi.input_ids.tolist()
            assert ids[i] >= 0 or -ids[i] - 1 == slot
        tokens = [data.draw(st.integers(0, 5)) for _ in batch.reqs]   # 0 is EOS
        for slot, t in zip(fi.future_slots, tokens):
            self.future[slot] = t
        self.in_flight.append((batch, batch.reqs, tokens))

    def process(self, data) -> None:
        if not self.in_flight:
            return
        batch, reqs, tokens = self.in_flight.pop(0)
        if batch == "prefill":
            req = reqs[0]
            req.num_pending -= 1
            if not req.is_finished:
                self.out.commit_token(req, tokens[0])
            return
        result = type("Result", (), {"next_token_ids": __import__("torch").tensor(tokens), "logprobs": None})
        self.out.commit(batch, result)

    def finish(self, data, abort: bool) -> None:
        if len(self.dm):
            req = self.dm.running[data.draw(st.integers(0, len(self.dm) - 1))]
            req.finish_reason = "abort" if abort else "stop"
            self.release(req)

    def check(self) -> None:
        rows = self.dm.rows
        mine, fresh = rows.state(), rows.rebuilt().state()

        def resolved(ids):
            return [self.future[-t - 1] if t < 0 else t for t in ids]
        assert resolved(mine.pop("input_ids")) == resolved(fresh.pop("input_ids"))
        assert mine == fresh
        assert all(not r.is_finished for r in rows.reqs)


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(6, 40), st.booleans())
def test_running_batch_equals_a_rebuild_after_any_sequence(data, num_pages, prefix_cache):
    sim = Sim(num_pages, prefix_cache)
    for op in data.draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=60)):
        if op in ("finish", "abort"):
            sim.finish(data, op == "abort")
        else:
            getattr(sim, op)(data)
        sim.check()
    sim.cache.allocator.check_integrity() if hasattr(sim.cache.allocator, "check_integrity") else None


def test_steady_step_touches_only_rows_that_grow_a_page():
    cache = CacheManager(PageAllocator(64), PAGE_SIZE)
    dm = DecodeManager(cache, on_retract=lambda r: None, on_fail=lambda r, why: None)
    reqs = []
    for i, n in enumerate((3, 4, 5)):      # the 4-token prompt fills its page: its next token needs one
        r = Req(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=9), eos_token_ids=EOS)
        r.future_slot = i
        cache.grow(r, n)
        r.kv_len, r.num_pending = n, 1
        dm.add(r)
        reqs.append(r)
    batch = dm.schedule()
    assert [len(r.page_table) for r in reqs] == [1, 2, 2]
    assert batch.rows.positions.tolist() == [3, 4, 5]
    assert np.array_equal(batch.rows.input_ids, [-1, -2, -3])
    assert batch.rows.page_table[1].tolist()[:2] == reqs[1].page_table


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_context_from_block_table_equals_one_from_page_lists(backend):
    tables = [[5, 9, 2], [7], [3, 4, 8, 1]]            # more pages than needed, as a running row may hold
    positions = [20, 0, 33]
    width = max(map(len, tables))
    block = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
    fast = AttentionContext.build_decode(np.array(positions), block, PAGE_SIZE * 4, "cpu", torch.float32, backend)
    ref = AttentionContext.build([1] * 3, positions, tables, [0] * 3, PAGE_SIZE * 4, True, "cpu", None,
                                 torch.float32, backend)
    for name in ("positions", "slot_mapping", "page_table", "mask", "pages", "page_start", "seq_lens"):
        a, b = getattr(fast, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.equal(a, b), name
