"""`pdcluster profile CONFIG --out PROFILE.json`: the cost model of `pdcluster plan`, measured
on a cluster launched from CONFIG (it needs a prefill and a decode worker).

Every figure comes from the router's own per-request phases (`GET /debug/requests/{id}`),
so it is what the cluster spends, not what a client sees: a prompt of T token ids with two
output tokens gives a prefill sample (T, `prefill_forward`) and a transfer sample (the
`kv_transfer` phase's bytes and duration); B such prompts of L tokens sent at once with M
output tokens give a decode sample (B, B x (L + M/2) context tokens, the median gap between
their token events after the first); `co_run` says how much prefill and decode slow each
other when they run at once (co_run.py). Prompts are random ids, distinct per request and
per run (a second profile of the same running cluster must not hit the first one's prefix
cache). Each point is measured `--repeats` times and its median kept: one sample on a shared
machine is often one other process's burst. `--url` measures a cluster already running from
CONFIG (so a profile and a benchmark can run on the same processes, minutes apart) instead
of launching one.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
from dataclasses import replace
from typing import Optional

import httpx

from cluster.config import ConfigError, load_config
from cluster.plan.co_run import measure_co_run

VOCAB_SPAN = (100, 20000)            # ids safe for any served tokenizer of the default size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the cluster to measure (TOML, with [[prefill]] and [[decode]])")
    p.add_argument("--out", required=True, help="where to write the profile (JSON)")
    p.add_argument("--prefill-tokens", default="16,64,128", help="prompt lengths to time")
    p.add_argument("--batches", default="1,4", help="decode batch sizes to time")
    p.add_argument("--contexts", default="16,64", help="prompt lengths of the decode batches")
    p.add_argument("--decode-tokens", type=int, default=6, help="output tokens per decode request")
    p.add_argument("--repeats", type=int, default=3, help="samples per point (the median is kept)")
    p.add_argument("--url", default=None, help="measure the cluster running at this router URL "
                   "(launched from CONFIG) instead of launching one")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Probe:
    """Requests of exact token lengths, each read back as the router's phases."""

    def __init__(self, http: httpx.AsyncClient, model: str, seed: Optional[int] = None):
        self.http, self.model, self.rng = http, model, random.Random(seed)

    async def trace(self, num_tokens: int, max_tokens: int) -> dict:
        ids = [self.rng.randrange(*VOCAB_SPAN) for _ in range(num_tokens)]
        resp = await self.http.post("/v1/completions", json={
            "model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True})
        resp.raise_for_status()
        got = await self.http.get(f"/debug/requests/{resp.headers['x-request-id']}")
        got.raise_for_status()
        return got.json()


def _phase(trace: dict, name: str) -> dict:
    return next(p for p in trace["phases"] if p["phase"] == name)


def step_gaps(trace: dict) -> list[float]:
    """Gaps between a request's token events after its first (its decode steps)."""
    times = [t["t_s"] for t in trace["tokens"]]
    return [b - a for a, b in zip(times[1:], times[2:])]


async def measure(http: httpx.AsyncClient, model: str, args) -> dict:
    probe = Probe(http, model)
    await probe.trace(16, 2)                                   # warm-up: first-call costs
    repeats = range(max(1, getattr(args, "repeats", 1)))
    prefill, transfer = [], []
    for n in _ints(args.prefill_tokens):
        traces = [await probe.trace(n, 2) for _ in repeats]
        prefill.append([n, statistics.median(_phase(t, "prefill_forward")["duration_s"] for t in traces)])
        kvs = [_phase(t, "kv_transfer") for t in traces]
        transfer.append([kvs[0].get("bytes", 0), statistics.median(kv["duration_s"] for kv in kvs)])
    decode = []
    m = args.decode_tokens
    for batch in _ints(args.batches):
        for ctx in _ints(args.contexts):
            steps = []
            for _ in repeats:
                traces = await asyncio.gather(*(probe.trace(ctx, m) for _ in range(batch)))
                gaps = [g for t in traces for g in step_gaps(t)]
                if gaps:
                    steps.append(statistics.median(gaps))
            if steps:
                decode.append([batch, batch * (ctx + m // 2), statistics.median(steps)])
    per_token = [b / n for (n, _), (b, _) in zip(prefill, transfer) if b]
    co_run = await measure_co_run(probe, int(statistics.median(_ints(args.prefill_tokens))), len(repeats))
    return {"prefill": prefill, "decode": decode, "transfer": transfer,
            "kv_bytes_per_token": statistics.median(per_token) if per_token else 0, "co_run": co_run}


def cmd_profile(args) -> int:
    from cluster.launch.launcher import LaunchError, Launcher
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"pdcluster profile: {e}", file=sys.stderr)
        return 2
    roles = {g.role for g in cfg.groups if g.count}
    if not {"prefill", "decode"} <= roles:
        print("pdcluster profile: the config needs [[prefill]] and [[decode]] workers", file=sys.stderr)
        return 2
    if args.url:
        try:
            profile = asyncio.run(_measure_at(args.url.rstrip("/").removesuffix("/v1"), cfg, args))
        except httpx.HTTPError as e:
            print(f"pdcluster profile: {args.url}: {e}", file=sys.stderr)
            return 1
        return _write(profile, args.out)
    cfg = replace(cfg, router=replace(cfg.router, port=_free_port(), host="127.0.0.1"))
    launcher = Launcher(cfg, args.config, tempfile.mkdtemp(prefix="pdcluster-profile-"))
    try:
        launcher.start()
        profile = asyncio.run(_measure_at(launcher.http_base, cfg, args))
    except (LaunchError, httpx.HTTPError) as e:
        print(f"pdcluster profile: {e} (logs in {launcher.log_dir})", file=sys.stderr)
        return 1
    finally:
        launcher.shutdown()
    return _write(profile, args.out)


def _write(profile: dict, out: str) -> int:
    with open(out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"profile: {out} ({len(profile['prefill'])} prefill, {len(profile['decode'])} decode, "
          f"{len(profile['transfer'])} transfer samples)")
    return 0


async def _measure_at(base_url: str, cfg, args) -> dict:
    headers = {"Authorization": f"Bearer {cfg.router.api_key}"} if cfg.router.api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=cfg.timeouts.request) as http:
        profile = await measure(http, cfg.model.name, args)
    group = {g.role: g for g in cfg.groups}
    return {"model": cfg.model.name, "device": cfg.model.device, "dtype": cfg.model.dtype,
            "max_prefill_tokens": group["prefill"].scheduler.max_prefill_tokens,
            "max_running_requests": group["decode"].scheduler.max_running_requests, **profile}
