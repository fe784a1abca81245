"""`pdcluster bench` reporting: vllm-bench-serve names, goodput, JSON file, PNG plots."""
import json
import os
from types import SimpleNamespace

import pytest

from cluster.bench import report as bench_report


def results():
    # two good requests, one slow, one failed; times in seconds from the run's start
    r = [{"ttft": 0.1, "itl": [0.02, 0.02, 0.02], "e2e": 0.16, "num_tokens": 4, "prompt_tokens": 10,
          "start": 0.0, "arrivals": [0.1, 0.12, 0.14, 0.16]},
         {"ttft": 0.2, "itl": [0.03, 0.03, 0.03], "e2e": 0.29, "num_tokens": 4, "prompt_tokens": 10,
          "start": 0.05, "arrivals": [0.25, 0.28, 0.31, 0.34]},
         {"ttft": 0.9, "itl": [0.1, 0.1, 0.1], "e2e": 1.2, "num_tokens": 4, "prompt_tokens": 10,
          "start": 0.1, "arrivals": [1.0, 1.1, 1.2, 1.3]},
         {"error": "HTTP 503: b'busy'"}]
    return r


def args(**kw):
    base = dict(model="m", concurrency=4, slo_ttft=None, slo_tpot=None, json=None, plot=None)
    return SimpleNamespace(**{**base, **kw})


def test_summary_uses_vllm_bench_serve_names_and_units():
    s = bench_report.summarize(results(), 2.0, args())
    for key in ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "input_lens", "output_lens", "ttfts", "itls", "errors",
                "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms"):
        assert key in s, key
    assert s["completed"] == 3 and s["failed"] == 1 and s["total_output_tokens"] == 12
    assert s["output_throughput"] == pytest.approx(6.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx(1000 * (0.02 + 0.03 + 0.1) / 3)
    assert s["request_goodput"] is None                 # no SLO given


def test_goodput_counts_requests_within_both_slos():
    s = bench_report.summarize(results(), 2.0, args(slo_ttft=0.25, slo_tpot=0.05))
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    s = bench_report.summarize(results(), 2.0, args(slo_ttft=0.15))
    assert s["request_goodput"] == pytest.approx(1 / 2.0)


def test_json_file_and_plots_are_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run.json"
    bench_report.report(results(), 2.0, args(json=str(out), plot=str(tmp_path / "plots")))
    saved = json.loads(out.read_text())
    assert saved["completed"] == 3 and saved["errors"][-1].startswith("HTTP 503")
    for name in ("latency_cdf.png", "throughput.png"):
        path = tmp_path / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000
    assert "Serving Benchmark Result" in capsys.readouterr().out


def test_json_to_stdout_is_pure_json(capsys):
    bench_report.report(results(), 2.0, args(json="-"))
    assert json.loads(capsys.readouterr().out)["completed"] == 3


def test_throughput_over_time_counts_every_token_once():
    xs, ys = bench_report.throughput_over_time(results()[:3], 2.0, bins=4)
    assert len(xs) == 4 and sum(y * 0.5 for y in ys) == pytest.approx(12)


def test_bad_arguments_fail_before_any_request():
    assert "must be > 0" in bench_report.check_arguments(args(slo_ttft=0.0))
    assert bench_report.check_arguments(args()) is None


def test_progress_bar_is_silent_without_a_tty(capsys):
    p = bench_report.Progress(3)
    p.update()
    p.close()
    assert p.bar is None and capsys.readouterr().err == ""


def test_loading_progress_yields_every_item_and_stays_silent_off_a_tty(capsys):
    from cluster.progress import progress
    assert list(progress(range(5), 5, "loading")) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().err == ""
