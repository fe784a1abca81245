"""`pdcluster plan --profile PROFILE.json --gpus N --slo-ttft S --slo-tpot S [--workload FILE]
[--tp 1,2] [--tp-efficiency E] [--layout NAME] [--rates R[,R..]]`: every static layout of N GPUs
(all unified, every xPyD; with `--tp`, workers of those tensor-parallel sizes) simulated under
the profile's cost model (a TP worker's steps scaled by its efficiency: costs.py); prints each
layout's predicted goodput and the best one for the SLO. `--layout` keeps one layout; `--rates`
adds each layout's predicted figures at those rates (attainment, TTFT, mean TPOT), to set
beside `pdcluster bench --request-rate` at the same rates. The cluster runs TP on unified (and dllm) workers only today: an xPyD
layout with TP is a prediction for when the KV handoff maps heads between TP sizes."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from cluster.plan.costs import CostModel, ProfileError
from cluster.bench.goodput import parse_rates
from cluster.plan.goodput import Limits, Slo, goodput, predict
from cluster.plan.simulate import layouts_for
from cluster.plan.workload import Workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", required=True, help="a cost profile written by `pdcluster profile`")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (one-GPU workers) to lay out")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S", help="TTFT target, seconds")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S", help="mean TPOT target, seconds")
    p.add_argument("--workload", default=None, help="JSON workload (cluster/plan/workload.py); "
                   "default 512-token prompts, 64 output tokens, Poisson arrivals")
    p.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLO")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--tp", default="1", metavar="T[,T..]", help="tensor-parallel sizes a worker may have "
                   "(default 1: one-GPU workers)")
    p.add_argument("--tp-efficiency", type=float, default=None, metavar="E",
                   help="speedup / tp of a TP worker's steps (default: the profile's tp_efficiency, else 0.8)")
    p.add_argument("--layout", default=None, metavar="NAME", help="only this layout (as printed: 1P1D, unified x2)")
    p.add_argument("--rates", default=None, metavar="R[,R..]",
                   help="also print each layout's predicted attainment, TTFT and TPOT at these request rates")


def plan(profile: dict, gpus: int, slo: Slo, workload: Workload, share: float = 0.9,
         tps: tuple[int, ...] = (1,), tp_efficiency: Optional[float] = None,
         layout: Optional[str] = None, rates: tuple[float, ...] = ()) -> dict:
    costs = CostModel.from_profile(profile)
    if tp_efficiency is not None:
        costs = dataclasses.replace(costs, tp_efficiency=tp_efficiency)
    limits = Limits(int(profile.get("max_prefill_tokens", Limits.max_prefill_tokens)),
                    int(profile.get("max_running_requests", Limits.max_running)))
    layouts = [one for one in layouts_for(gpus, tps) if layout in (None, one.name)]
    if not layouts:
        raise ValueError(f"--layout {layout!r} is not a layout of {gpus} GPUs")
    rows = [{"layout": one.name,
             "goodput_rps": goodput(one, costs, workload, slo, share=share, limits=limits),
             **({"at_rates": [predict(one, costs, workload, slo, r, limits) for r in rates]} if rates else {})}
            for one in layouts]
    ranked = [r for r in rows if r["goodput_rps"] is not None]
    best = max(ranked, key=lambda r: r["goodput_rps"], default=None)
    return {"gpus": gpus, "slo_ttft_s": slo.ttft, "slo_tpot_s": slo.tpot, "attainment": share,
            "tp_efficiency": costs.tp_efficiency if tps != (1,) else None, "layouts": rows, "best": best}


def cmd_plan(args) -> int:
    if args.gpus < 1:
        print("pdcluster plan: --gpus must be >= 1", file=sys.stderr)
        return 2
    try:
        tps = tuple(sorted({int(t) for t in args.tp.split(",")}))
        if not tps or tps[0] < 1:
            raise ValueError(f"--tp {args.tp}: sizes must be >= 1")
        with open(args.profile) as f:
            profile = json.load(f)
        rates = tuple(parse_rates(args.rates)) if args.rates else ()
        out = plan(profile, args.gpus, Slo(args.slo_ttft, args.slo_tpot), Workload.load(args.workload),
                   args.attainment, tps, args.tp_efficiency, args.layout, rates)
    except (OSError, ValueError, ProfileError) as e:
        print(f"pdcluster plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"SLO: TTFT <= {args.slo_ttft} s, TPOT <= {args.slo_tpot} s, {args.attainment:.0%} of requests"
          + (f"; TP steps {out['tp_efficiency']:g} x tp faster" if out["tp_efficiency"] else ""))
    for r in out["layouts"]:
        g = r["goodput_rps"]
        print(f"  {r['layout']:>12}: {'unreachable' if g is None else f'{g:.3g} req/s'}")
        for at in r.get("at_rates", ()):
            print(f"  {'':>12}  at {at['rate']:g} req/s ({at['num_requests']} requests): {at['slo_attainment']:.0%} "
                  f"meet the SLO, TTFT p50 {at['median_ttft_ms']:.0f} ms, p99 {at['p99_ttft_ms']:.0f} ms, "
                  f"TPOT mean {at['mean_tpot_ms']} ms")
    best = out["best"]
    print(f"best: {best['layout']} at {best['goodput_rps']:.3g} req/s" if best else "best: none meets the SLO")
    return 0
