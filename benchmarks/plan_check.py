"""`pdcluster plan` against a measured run on this machine: predicted vs measured, per rate.

One 1 prefill + 1 decode cluster of the default model (configs/local.toml without its DLLM
group) is launched, and on its processes, back to back, each rate bracketed by two profiles:
    profile 0, bench R1, profile 1, bench R2, profile 2, ...
where a profile is `pdcluster profile CONFIG --url ...` (the cost model) and a bench is
`pdcluster bench --request-rate R`: Poisson arrivals (seed 0), `--seconds` of arrivals
(ceil(seconds x R) requests), prompts of `--prompt-words` words under a distinct leading tag
(no shared prefix), `--max-tokens` outputs. On a shared machine the load moves within
minutes; the profiles just before and just after a rate show by how much.
Then `pdcluster plan --layout 1P1D --rates R` on both of a rate's profiles, with a workload of
the bench's own lengths (prompt tokens counted by the router's /tokenize), count and seed: the
simulation replays the very Poisson arrival times the bench sent. A third prediction ("run")
uses the costs the run itself paid (benchmarks/run_costs.py: its prefill forwards and decode
steps), which leaves only the simulator's scheduling rules to differ from the measurement.
The table sets the predicted attainment, TTFT and mean TPOT beside the measured ones, and the
goodput over the swept rates; below it, where each rate's measured TTFT went (router phases).

    python benchmarks/plan_check.py          # rates 1,4; 30 s of arrivals each; SLO 2 s / 0.25 s
    python benchmarks/plan_check.py --rates 0.5,2,4 --seconds 60 --json plan_check.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import Cluster, disagg_config, machine, now_utc  # noqa: E402
from benchmarks.run_costs import fetch_traces, phase_means, run_profile  # noqa: E402
from cluster.bench.client import cycled_prompt  # noqa: E402
from tests.cluster_harness import pdcluster_cmd  # noqa: E402

PROFILE_ARGS = ["--prefill-tokens", "16,64,256", "--batches", "1,4,8", "--contexts", "16,64",
                "--repeats", "3"]
FIGURES = (("slo_attainment", "SLO met", 1), ("median_ttft_ms", "TTFT p50 ms", 0),
           ("p99_ttft_ms", "TTFT p99 ms", 0), ("mean_tpot_ms", "TPOT mean ms", 1))


def pdcluster(*args: str) -> str:
    done = subprocess.run(pdcluster_cmd() + list(args), capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"pdcluster {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def bench_prompt(rate: float, i: int, words: int) -> str:
    """What `pdcluster bench --request-rate` sends (cluster/bench/goodput.py's sweep)."""
    return f"request {rate:g}-{i}: " + cycled_prompt(i, words)


def prompt_tokens(base_url: str, rate: float, num: int, words: int) -> int:
    counts = [httpx.post(base_url + "/tokenize", json={"prompt": bench_prompt(rate, i, words)}, timeout=30)
              .json()["count"] for i in range(num)]
    return round(statistics.mean(counts))


def plan_1p1d(profile: str, num: int, input_len: int, args, out_dir: str, *rates: float) -> dict:
    """`pdcluster plan` of the measured layout on the bench's workload (`num` requests, seed 0)."""
    workload = os.path.join(out_dir, f"workload-{num}.json")
    with open(workload, "w") as f:
        json.dump({"input_len": input_len, "output_len": args.max_tokens, "num_requests": num,
                   "arrival": "poisson", "seed": 0}, f)
    extra = ["--rates", ",".join(f"{r:g}" for r in rates)] if rates else []
    out = json.loads(pdcluster("plan", "--profile", profile, "--gpus", "2", "--layout", "1P1D",
                               "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
                               "--attainment", str(args.attainment), "--workload", workload, "--json", *extra))
    return out["layouts"][0]


def swept_goodput(rows: list[dict], share: float):
    ok = [r["rate"] for r in rows if r["slo_attainment"] >= share]
    return max(ok) if ok else None


def fmt(x, digits: int) -> str:
    if x is None:
        return "-"
    return f"{x:.0%}" if digits == 1 and x <= 1 else f"{x:.{digits}f}"


def table(result: dict) -> str:
    head = f"{'rate':>5} {'reqs':>5} {'window s':>8}" + "".join(
        f" | {name:>24}" for _, name, _ in FIGURES)
    sub = f"{'':>20}" + "".join(f" | {'before/after/run/meas':>24}" for _ in FIGURES)
    lines = [head, sub]
    for m in result["rates"]:
        cells = ""
        for key, _, digits in FIGURES:
            four = [m["predicted_before"][key], m["predicted_after"][key], m["predicted_run"][key], m["measured"][key]]
            cells += " | " + f"{'/'.join(fmt(x, digits) for x in four):>24}"
        lines.append(f"{m['rate']:>5g} {m['measured']['num_requests']:>5} "
                     f"{m['measured']['arrival_window_s']:>8g}{cells}")
    g = result["goodput"]
    lines.append(f"goodput over the swept rates: predicted {g['predicted_before']} / {g['predicted_after']} / "
                 f"{g['predicted_run']} (the profile before / after each rate / the run's own steps), measured {g['measured']} req/s; plan's own "
                 f"search (a 10% grid, 200 requests a rate; first / last profile): {fmt(g['plan_before'], 2)} / {fmt(g['plan_after'], 2)} req/s")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1,4", help="request rates to measure and predict")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of arrivals per rate")
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.25)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--json", default=None, help="write everything measured and predicted here")
    args = ap.parse_args()
    rates = sorted(float(r) for r in args.rates.split(","))
    out_dir = tempfile.mkdtemp(prefix="plan-check-")
    result = {"machine": machine(), "date": now_utc(), "command": " ".join(sys.argv),
              "window": f"{args.seconds:g} s of Poisson arrivals per rate (seed 0)",
              "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "attainment": args.attainment}}
    with Cluster(disagg_config(), "plan-check") as c:
        cfg = c.config_path
        result["uptime"] = [uptime()]
        measured, phases, windows, traces = {}, {}, {}, {}
        for i, r in enumerate([None, *rates]):
            if r is not None:
                bench_json = f"{out_dir}/bench-{r:g}.json"
                started = time.time()
                pdcluster("bench", "--url", c.base_url + "/v1", "--request-rate", f"{r:g}",
                          "--rate-seconds", f"{args.seconds:g}", "--prompt-len", str(args.prompt_words),
                          "--max-tokens", str(args.max_tokens), "--slo-ttft", str(args.slo_ttft),
                          "--slo-tpot", str(args.slo_tpot), "--attainment", str(args.attainment),
                          "--json", bench_json)
                windows[r] = (started, time.time())
                with open(bench_json) as f:
                    measured[r] = json.load(f)["rates"][0]
                traces[r] = fetch_traces(c.base_url, measured[r]["request_ids"])
                phases[r] = phase_means(traces[r])
            pdcluster("profile", cfg, "--url", c.base_url, "--out", f"{out_dir}/profile-{i}.json", *PROFILE_ARGS)
            result["uptime"].append(uptime())
        lengths = {r: prompt_tokens(c.base_url, r, measured[r]["num_requests"], args.prompt_words) for r in rates}
        decode_log = c.log("decode-0")
    result["profiles"] = []
    for i in range(len(rates) + 1):
        with open(f"{out_dir}/profile-{i}.json") as f:
            result["profiles"].append(json.load(f))
    result["rates"] = []
    for i, r in enumerate(rates):
        m = measured[r]
        row = {"rate": r, "prompt_tokens": lengths[r], "measured_phases_ms": phases[r],
               "measured": {k: v for k, v in m.items() if k not in ("ttft_tpot_s", "request_ids")}}
        row["run_profile"] = run_profile(traces[r], decode_log, *windows[r], result["profiles"][i])
        with open(f"{out_dir}/run-{r:g}.json", "w") as f:
            json.dump(row["run_profile"], f)
        for name, path in (("before", f"profile-{i}"), ("after", f"profile-{i + 1}"), ("run", f"run-{r:g}")):
            row[f"predicted_{name}"] = plan_1p1d(f"{out_dir}/{path}.json", m["num_requests"], lengths[r],
                                                 args, out_dir, r)["at_rates"][0]
        result["rates"].append(row)
    typical = round(statistics.mean(lengths.values()))
    result["goodput"] = {
        "measured": swept_goodput([x["measured"] for x in result["rates"]], args.attainment),
        **{f"predicted_{p}": swept_goodput([x[f"predicted_{p}"] for x in result["rates"]], args.attainment)
           for p in ("before", "after", "run")},
        **{f"plan_{p}": plan_1p1d(f"{out_dir}/profile-{j}.json", 200, typical, args, out_dir)["goodput_rps"]
           for p, j in (("before", 0), ("after", len(rates)))}}
    print(f"{result['date']}; {result['machine']}\n{result['window']}; SLO TTFT <= {args.slo_ttft} s, "
          f"TPOT <= {args.slo_tpot} s for {args.attainment:.0%}")
    print("uptime at the start and after each profile:\n  " + "\n  ".join(result["uptime"]))
    print(table(result))
    for row in result["rates"]:
        print(f"rate {row['rate']:g}, mean ms per router phase: {row['measured_phases_ms']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
