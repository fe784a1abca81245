"""`pdcluster bench --request-rate`: Poisson arrivals at the asked rate, SLO attainment per
rate, goodput as the highest rate meeting the attainment, and the attainment plot."""
import argparse
import os

import pytest

from cluster.bench import cli as bench, goodput as bench_goodput


def test_arrivals_are_poisson_at_the_rate_and_seeded():
    times = bench_goodput.arrival_times(4.0, 4000, seed=1)
    assert times[0] == 0.0 and times == sorted(times)
    assert 0.23 < times[-1] / len(times) < 0.27             # mean gap 1 / rate
    assert times == bench_goodput.arrival_times(4.0, 4000, seed=1)
    assert times != bench_goodput.arrival_times(4.0, 4000, seed=2)


def test_rates_parse_sorted_and_bad_rates_are_refused():
    assert bench_goodput.parse_rates("4,1,2.5") == [1.0, 2.5, 4.0]
    for bad in ("", "0", "-1", "fast"):
        with pytest.raises(ValueError, match="--request-rate"):
            bench_goodput.parse_rates(bad)


def test_attainment_counts_slo_and_goodput_is_the_highest_rate_meeting_it(tmp_path):
    args = argparse.Namespace(slo_ttft=1.0, slo_tpot=0.05, model="m", concurrency=None)
    fast = {"ttft": 0.5, "e2e": 0.5 + 0.04 * 9, "num_tokens": 10, "itl": [0.04] * 9, "start": 0.0}
    slow_first = {**fast, "ttft": 1.5, "e2e": 1.5 + 0.36}
    slow_steps = {**fast, "e2e": 0.5 + 0.06 * 9}
    row = bench_goodput.rate_summary(2.0, [fast, fast, slow_first, slow_steps, {"error": "x"}], 10.0, args)
    assert row["slo_attainment"] == 0.4 and row["completed"] == 4
    assert bench_goodput.attainment_at(row, 1.0, 0.05) == 0.4                 # the run's own SLO
    assert bench_goodput.attainment_at(row, 2.0, 0.1) == 0.8                  # looser: only the error fails
    assert bench_goodput.attainment_at(row, 1.0, 0.03) == 0.0                 # tighter TPOT: nobody
    rows = [{"rate": 1, "slo_attainment": 1.0}, {"rate": 2, "slo_attainment": 0.95},
            {"rate": 4, "slo_attainment": 0.5}, {"rate": 6, "slo_attainment": 0.91}]
    assert bench_goodput.goodput(rows, 0.9) == 6 and bench_goodput.goodput(rows[2:3], 0.9) is None
    path = bench_goodput.plot_attainment({"1P1D": rows, "unified": rows[:2]}, str(tmp_path), "t", 0.9)
    assert os.path.getsize(path) > 1000


def test_bench_cli_takes_the_open_loop_flags():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--request-rate", "1,2", "--slo-ttft", "1", "--slo-tpot", "0.05"])
    assert (args.request_rate, args.slo_ttft, args.attainment) == ("1,2", 1.0, 0.9)


def test_each_rate_runs_thirty_seconds_of_arrivals_unless_a_count_is_given():
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    args = p.parse_args(["--request-rate", "0.5,4"])
    assert [bench_goodput.requests_at(r, args) for r in (0.5, 4.0)] == [15, 120]   # 30 s x rate
    short = p.parse_args(["--request-rate", "4", "--rate-seconds", "2"])
    assert bench_goodput.requests_at(4.0, short) == 8
    counted = p.parse_args(["--request-rate", "4", "--num-requests", "5"])
    assert bench_goodput.requests_at(4.0, counted) == 5


def test_a_rate_row_states_its_window():
    args = argparse.Namespace(slo_ttft=1.0, slo_tpot=None, model="m", concurrency=None)
    ok = {"ttft": 0.5, "e2e": 0.6, "num_tokens": 2, "itl": [0.1], "start": 0.0}
    row = bench_goodput.rate_summary(2.0, [ok, ok], 31.0, args, arrival_window=30.25)
    assert (row["num_requests"], row["arrival_window_s"]) == (2, 30.25)
