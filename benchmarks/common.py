"""Shared pieces of the cluster benchmarks: the machine, configs, one streamed request, stats.

    with Cluster(toml_text, "name", env={...}) as c:      # `pdcluster launch` in a subprocess
        r = asyncio.run(stream_completion(c.base_url, prompt, max_tokens=4))
        c.log("decode-0"), c.metrics()

`Cluster` is the integration tests' launcher (`tests/cluster_harness.py`): one way to start
and tear down a real cluster, for tests and benchmarks alike.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from typing import Optional

from tests.cluster_harness import REPO, LaunchedCluster as Cluster  # noqa: F401

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def machine() -> str:
    model = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def disagg_config(base: str = "configs/local.toml", scheduler: Optional[dict] = None,
                  model: Optional[dict] = None) -> str:
    """`base` without its [[dllm]] group, with [scheduler] / [model] keys overridden."""
    lines, skip, section = [], False, ""
    for line in (REPO / base).read_text().splitlines():
        head = line.strip()
        if head.startswith("["):
            skip = head == "[[dllm]]"
            section = head.strip("[]")
        if skip:
            continue
        key = head.split("=", 1)[0].strip() if "=" in head and not head.startswith("#") else None
        overrides = {"scheduler": scheduler or {}, "model": model or {}}.get(section, {})
        if key in overrides:
            continue
        lines.append(line)
        if head in ("[scheduler]", "[model]"):
            for k, v in overrides.items():
                lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines) + "\n"


def log_time(line: str) -> Optional[float]:
    """Unix time of a worker log line (`%(asctime)s`: local time, millisecond resolution)."""
    m = LOG_TIME.match(line)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} for every sample of `name` in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name):]] = float(value)
    return out


async def stream_completion(client, prompt, max_tokens: int, model: Optional[str] = None) -> dict:
    """One streamed greedy completion: wall-clock send / first / last token times, rid, usage."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t_send = time.time()
    arrivals, rid, usage = [], None, {}
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            rid = rid or event.get("id", "").removeprefix("cmpl-")
            if event.get("usage"):
                usage = event["usage"]
            elif event.get("choices"):
                choice = event["choices"][0]
                if choice.get("text") or choice.get("finish_reason") is None:
                    arrivals.append(time.time())     # a token chunk (text may be held back)
    return {"rid": rid, "t_send": t_send, "arrivals": arrivals, "t_end": time.time(), "usage": usage}


def wait_healthy(url: str, timeout: float = 120) -> None:
    """Until `url`/health answers 200 (a router started by hand, not by `Cluster`)."""
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy in {timeout:g} s")


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
