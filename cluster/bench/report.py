"""What `pdcluster bench` reports: the summary, `--json [FILE]`, `--plot DIR` and the progress bar.

The summary uses `vllm bench serve`'s result names, so its JSON files feed the same
scripts: `duration`, `completed`, `failed`, `request_throughput`, `request_goodput`,
`output_throughput`, `total_token_throughput`, `{mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms`,
and per request `input_lens`, `output_lens`, `ttfts`, `itls`, `e2els`, `start_times`,
`errors`. TPOT is vLLM's: (e2e - ttft) / (output tokens - 1), per request.
A request is good (goodput) when it succeeded within `--slo-ttft` and `--slo-tpot`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Optional

from cluster.progress import ProgressBar

METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
PERCENTILES = (90, 99)
THROUGHPUT_BINS = 40                 # points of the throughput-over-time curve


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="results as JSON with vllm bench serve's names, to FILE (stdout without)")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="draw latency CDFs (TTFT, ITL, E2E) and throughput over time as PNGs "
                        "into DIR (needs matplotlib: pip install 'pdcluster[plot]')")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S",
                   help="goodput: a good request has its first token within S seconds")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S",
                   help="goodput: a good request has a time per output token within S seconds")


def check_arguments(args) -> Optional[str]:
    """An error message for arguments that cannot work, before any request is sent."""
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return "--plot needs matplotlib: pip install 'pdcluster[plot]'"
    for name in ("slo_ttft", "slo_tpot"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            return f"--{name.replace('_', '-')} must be > 0"
    return None


def tpot(r: dict) -> Optional[float]:
    n = r["num_tokens"]
    return (r["e2e"] - r["ttft"]) / (n - 1) if n > 1 else None


def is_good(r: dict, slo_ttft: Optional[float], slo_tpot: Optional[float]) -> bool:
    return "error" not in r and meets_slo(r["ttft"], tpot(r), slo_ttft, slo_tpot)


def meets_slo(ttft: float, tpot_s: Optional[float], slo_ttft: Optional[float], slo_tpot: Optional[float]) -> bool:
    """A one-token answer (no TPOT) cannot miss the TPOT bound; an unset bound is met."""
    return ((slo_ttft is None or ttft <= slo_ttft) and
            (slo_tpot is None or tpot_s is None or tpot_s <= slo_tpot))


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM uses)."""
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[dict], duration: float, args) -> dict:
    """The run's figures under vLLM's names; latencies in ms, per-request lists in s."""
    ok = [r for r in results if "error" not in r]
    slo_ttft, slo_tpot = getattr(args, "slo_ttft", None), getattr(args, "slo_tpot", None)
    has_slo = slo_ttft is not None or slo_tpot is not None
    total_in = sum(r.get("prompt_tokens", 0) for r in ok)
    total_out = sum(r["num_tokens"] for r in ok)
    per = lambda n: round(n / duration, 4) if duration > 0 else 0.0   # noqa: E731
    out = {"model": args.model, "num_prompts": len(results),
           "max_concurrency": getattr(args, "concurrency", None),
           "duration": round(duration, 4), "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": per(len(ok)),
           "request_goodput": per(sum(is_good(r, slo_ttft, slo_tpot) for r in results))
           if has_slo else None,
           "output_throughput": per(total_out), "total_token_throughput": per(total_in + total_out)}
    samples = {"ttft": [r["ttft"] for r in ok], "tpot": [t for r in ok if (t := tpot(r)) is not None],
               "itl": [x for r in ok for x in r["itl"]], "e2el": [r["e2e"] for r in ok]}
    for name, xs in samples.items():
        ms = [1000 * x for x in xs]
        out[f"mean_{name}_ms"] = round(statistics.fmean(ms), 3) if ms else None
        out[f"median_{name}_ms"] = round(statistics.median(ms), 3) if ms else None
        out[f"std_{name}_ms"] = round(statistics.pstdev(ms), 3) if ms else None
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = round(percentile(ms, p), 3) if ms else None
    out.update(input_lens=[r.get("prompt_tokens", 0) for r in results],
               output_lens=[r.get("num_tokens", 0) for r in results],
               ttfts=[r.get("ttft", 0.0) for r in results], itls=[r.get("itl", []) for r in results],
               e2els=[r.get("e2e", 0.0) for r in results],
               start_times=[r.get("start", 0.0) for r in results],
               errors=[r.get("error", "") for r in results])
    return out


def print_summary(s: dict, file=None) -> None:
    file = file or sys.stdout
    row = lambda label, v: print(f"{label:<40} {v}", file=file)   # noqa: E731
    print("{:=^50}".format(" Serving Benchmark Result "), file=file)
    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    row("Benchmark duration (s):", f"{s['duration']:.2f}")
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", f"{s['request_throughput']:.2f}")
    if s["request_goodput"] is not None:
        row("Request goodput (req/s):", f"{s['request_goodput']:.2f}")
    row("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")
    for name, header in METRICS.items():
        print("{:-^50}".format(header), file=file)
        for stat in ("mean", "median") + tuple(f"p{p}" for p in PERCENTILES):
            v = s[f"{stat}_{name}_ms"]
            row(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):",
                "-" if v is None else f"{v:.2f}")
    print("=" * 50, file=file)
    for e in sorted({e for e in s["errors"] if e})[:5]:
        print(f"error: {e}", file=file)


def write_json(summary: dict, path: str) -> None:
    text = json.dumps(summary, indent=2)
    if path == "-":
        print(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def throughput_over_time(results: list[dict], duration: float, bins: int = THROUGHPUT_BINS):
    """(bin centers in s, output tokens/s per bin) from every token's arrival time."""
    width = max(duration, 1e-9) / bins
    counts = [0] * bins
    for r in results:
        for t in r.get("arrivals", []):
            counts[min(bins - 1, max(0, int(t / width)))] += 1
    return [(i + 0.5) * width for i in range(bins)], [c / width for c in counts]


def plot(results: list[dict], duration: float, out_dir: str, title: str = "") -> list[str]:
    """latency_cdf.png (TTFT, ITL, E2E) and throughput.png in `out_dir`; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")                               # files only, no display
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in results if "error" not in r]
    series = {"TTFT": [r["ttft"] for r in ok], "ITL": [x for r in ok for x in r["itl"]],
              "E2E": [r["e2e"] for r in ok]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, xs) in zip(axes, series.items()):
        xs = sorted(1000 * x for x in xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
            for p, style in ((50, ":"), (99, "--")):
                ax.axvline(percentile(xs, p), color="grey", linestyle=style, linewidth=0.8,
                           label=f"p{p} {percentile(xs, p):.1f} ms")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{name} CDF ({len(xs)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of samples")
    if title:
        fig.suptitle(title, fontsize=10)
    cdf_path = save_png(fig, out_dir, "latency_cdf.png")
    xs, ys = throughput_over_time(ok, duration)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(xs, ys, marker=".")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output throughput over time" + (f" - {title}" if title else ""), fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return [cdf_path, save_png(fig, out_dir, "throughput.png")]


def save_png(fig, out_dir: str, name: str) -> str:
    """Lay out, write OUT_DIR/NAME and free the figure; -> its path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Progress(ProgressBar):
    """Requests done, on a terminal only."""

    def __init__(self, total: int):
        super().__init__(total, "requests", unit="req")


def report(results: list[dict], duration: float, args) -> dict:
    """Print (or save) the summary and draw the plots the arguments ask for."""
    summary = summarize(results, duration, args)
    if args.json:
        write_json(summary, args.json)
    if args.json != "-":
        print_summary(summary)
    if args.plot:
        title = f"{args.model}, {len(results)} requests, concurrency {args.concurrency}"
        for path in plot(results, duration, args.plot, title):
            print(f"plot: {path}", file=sys.stderr if args.json == "-" else sys.stdout)
    return summary
