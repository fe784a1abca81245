"""Iteration identity: every stats line names the iteration that launched its batch."""
import re

import pytest
from hypothesis import given, settings, strategies as st

from cluster.config import default_config
from cluster.sampling_params import SamplingParams
from cluster.runtime.schedule_batch import ForwardMode, Req, ScheduleBatch
from tests.overlap_handshake import ProcessingHandshake
from tests.scripted_scheduler import ScriptedScheduler

ITER = re.compile(r"^(Prefill|Decode) batch \[(\d+)\]")


def line_iters(lines):
    return [int(ITER.match(l).group(2)) for l in lines]


def test_prefill_and_decode_lines_use_launch_iter_under_overlap():
    s = ScriptedScheduler(["prefill", "decode", "decode", "prefill", "decode"], overlap=True).run()
    # batch N is processed only after N+1 was launched, when forward_ct is already N+1
    assert s.lines[0].startswith("Prefill batch [1],")
    assert s.lines[1].startswith("Decode batch [2],")
    assert line_iters(s.lines) == [1, 2, 3, 4, 5]
    assert s.forward_ct == 5


def test_overlap_launches_next_batch_before_processing_previous():
    s = ScriptedScheduler(["prefill", "decode", "decode"], overlap=True)
    events = []
    orig_build, orig_process = s.build_forward_input, s.process_batch_result
    s.build_forward_input = lambda b: (events.append(("launch", b.forward_iter)), orig_build(b))[1]
    s.process_batch_result = lambda b, r: (events.append(("process", b.forward_iter)), orig_process(b, r))[1]
    s.run()
    assert events == [("launch", 1), ("launch", 2), ("process", 1), ("launch", 3), ("process", 2), ("process", 3)]


def test_idle_pass_after_a_batch_keeps_iterations_distinct():
    s = ScriptedScheduler(["prefill", "idle", "decode", "idle", "idle", "decode", "prefill"], overlap=True).run()
    iters = line_iters(s.lines)
    assert iters == [1, 2, 3, 4]
    assert len(set(iters)) == len(iters)


def test_normal_loop_prefill_line_shows_its_own_launch():
    s = ScriptedScheduler(["prefill", "decode", "idle", "prefill"], overlap=False).run()
    assert s.lines[0].startswith("Prefill batch [1],")
    assert line_iters(s.lines) == [1, 2, 3]


def test_idle_pass_does_not_touch_forward_ct():
    s = ScriptedScheduler(["idle", "idle", "prefill", "idle"], overlap=True).run()
    assert s.forward_ct == 1 and s.launched == [1]


def test_log_suffix_can_be_turned_off_by_env():
    on = default_config(env={"PDCLUSTER_LOG_FORWARD_ITERS": "0"}).group_of("prefill-0").scheduler.log_forward_iters
    s = ScriptedScheduler(["prefill", "decode"], overlap=True, log_forward_iters=on).run()
    assert s.lines[0].startswith("Prefill batch, #new-seq: 1")
    assert s.stats.reported_iters == [("prefill", 1), ("decode", 2)]   # metrics keep the iteration


def test_gauges_carry_the_launch_iteration():
    s = ScriptedScheduler(["prefill", "decode"], overlap=True)
    seen = []
    orig = s.report_prefill_stats
    s.report_prefill_stats = lambda b, st: (orig(b, st), seen.append(s.stats.gauges()["forward_iter"]))[0]
    s.run()
    assert seen == [1]
    assert s.stats.gauges()["forward_iter"] == 2


def test_copy_keeps_forward_iter():
    b = ScheduleBatch([Req("a", [1, 2], SamplingParams())], ForwardMode.EXTEND, extend_lens=[2])
    b.forward_iter = 41
    c = b.copy()
    assert c.forward_iter == 41 and c.reqs == b.reqs and c.reqs is not b.reqs


def test_fallback_to_forward_ct_only_without_batch_or_snapshot():
    s = ScriptedScheduler([], overlap=False)
    s.forward_ct = 9
    b = ScheduleBatch([Req("a", [1], SamplingParams())], ForwardMode.DECODE)
    assert s.iteration_of(None) == 9
    assert s.iteration_of(b) == 9                    # no snapshot yet
    b.forward_iter = 3
    assert s.iteration_of(b) == 3                    # snapshot wins even though forward_ct moved on


@settings(max_examples=60, deadline=None)
@given(script=st.lists(st.sampled_from(["prefill", "decode", "idle"]), max_size=40),
       overlap=st.booleans())
def test_reported_iterations_equal_launch_counts(script, overlap):
    s = ScriptedScheduler(script, overlap=overlap).run()
    launches = [k for k in script if k != "idle"]
    # each launch k (1-based) is reported exactly once with iteration k, in launch order
    assert [it for _, it in s.stats.reported_iters] == list(range(1, len(launches) + 1))
    assert [m for m, _ in s.processed] == ["extend" if k == "prefill" else "decode" for k in launches]
    assert s.forward_ct == len(launches)


def overlap_fraction(trace):
    """Fraction of passes in which batch N's processing overlaps batch N+1's forward."""
    forwards = {it: (t0, t1) for kind, it, t0, t1 in trace if kind == "forward"}
    processes = {it: (t0, t1) for kind, it, t0, t1 in trace if kind == "process"}
    pairs = [(processes[n], forwards[n + 1]) for n in processes if n + 1 in forwards]
    hits = sum(1 for (p0, p1), (f0, f1) in pairs if p0 < f1 and f0 < p1)
    return hits / len(pairs)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlap_is_real(overlap):
    """Batch N+1's forward is still running on the forward thread when N's processing begins: the
    handshake holds it there until then (a loop that processed N only after N+1's forward would
    leave it waiting in vain), so every pass overlaps, whatever the load on the machine."""
    s = ScriptedScheduler(["decode"] * 30, overlap=overlap, forward_s=0.01, process_s=0.005)
    s.trace, s.executor.trace = [], []
    handshake = ProcessingHandshake(s)
    s.run()
    trace = s.trace + s.executor.trace
    frac = overlap_fraction(trace)
    assert handshake.timed_out == []
    if overlap:
        assert frac == 1.0, frac
    else:
        assert frac == 0.0, frac


def test_decode_lines_come_for_the_first_batch_then_every_interval_naming_their_iteration():
    from cluster.runtime.stats import DecodeStats, IterationStats
    stats = IterationStats(log_forward_iters=True, decode_log_interval=3)
    lines = [stats.report_decode(it, 1, DecodeStats(1, 4)) for it in range(10, 17)]
    assert [line_iters([l])[0] for l in lines if l is not None] == [10, 13, 16]
    assert stats.forward_iter == 16 and stats.reported_iters == [("decode", 10), ("decode", 13), ("decode", 16)]
