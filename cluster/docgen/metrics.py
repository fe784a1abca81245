"""docs/reference/metrics.md: the metric names, kinds, labels and help texts the router's
`/metrics` exports, read from the router's own metric definitions (cluster/router/metrics.py)
and the heartbeat's declaration of worker metrics (`WorkerGauges`, cluster/wire/gauges.py)."""
from __future__ import annotations

from cluster.docgen.source import cell, header
from cluster.config import SloConfig
from cluster.router.metrics import RouterMetrics, WorkerStatsCollector
from cluster.router.role_switch import RoleSwitches
from cluster.router.slo import SloWindow
from cluster.wire.gauges import COUNTER, WorkerGauges

INTRO = """\
`GET /metrics` on the router is Prometheus text (`prometheus_client`). Every name has the
prefix `pdcluster:`. The router's own metrics describe requests as clients see them; worker
metrics come from each worker's last heartbeat, read at scrape time, with the labels `role`
and `worker` (the worker id); a worker that dies stops being exported. A counter's samples
carry the suffix `_total`, a histogram's `_bucket`, `_sum` and `_count`.
"""
ONE_WORKER = ("decode", "decode-0")
OPEN_LABELS = ("role", "worker", "reason", "from", "to")       # values come from the workers


def _families(collector) -> list:
    return list(collector.collect())


def _sample_name(family) -> str:
    return family.name + ("_total" if family.type == "counter" else "")


def _labels(family) -> str:
    """Each label, with the values it takes where the router fixes them (outcome, phase)."""
    values: dict[str, list] = {}
    for sample in family.samples:
        for key, value in sample.labels.items():
            if key != "le" and value not in values.setdefault(key, []):
                values[key].append(value)
    return ", ".join(f"`{k}`" + ("" if k in OPEN_LABELS else f" ({', '.join(v)})") for k, v in values.items())


def _rows(families) -> list[str]:
    rows = ["| name | kind | labels | meaning |", "| --- | --- | --- | --- |"]
    for f in families:
        rows.append(f"| `{_sample_name(f)}` | {f.type} | {cell(_labels(f))} | {cell(f.documentation)} |")
    return rows + [""]


def _declared_rows() -> list[str]:
    rows = ["| name | kind | labels | meaning |", "| --- | --- | --- | --- |"]
    for d in WorkerGauges.declared():
        name = d.name + ("_total" if d.kind == COUNTER and not d.name.endswith("_total") else "")
        labels = ", ".join(f"`{k}`" for k in ("role", "worker", d.label) if k)
        rows.append(f"| `pdcluster:{name}` | {d.kind} | {labels} | {cell(d.help)} |")
    return rows + [""]


def _slo_families() -> list:
    """The SLO families as a router with `[slo]` targets exports them after one request."""
    window = SloWindow(SloConfig(ttft=1.0, tpot=0.05))
    window.observe(0.5, 0.01)
    return _families(window)


def _role_switch_families() -> list:
    switches = RoleSwitches(directory=None, send=None)
    switches.counts[("prefill", "decode")] = 1
    return _families(switches)


def render() -> str:
    router = RouterMetrics()
    # one live worker that reports nothing, restarted once: the router's own families show their labels
    workers = WorkerStatsCollector(lambda: [(*ONE_WORKER, WorkerGauges())],
                                   lambda: {ONE_WORKER[1]: (ONE_WORKER[0], 1)}, lambda: {})
    out = [header("Metrics", "cluster/router/metrics.py and cluster/wire/gauges.py"), INTRO,
           "## Router", "", *_rows(_families(router.registry) + _role_switch_families()),
           "With an `[slo]` target set (docs/reference/config.md), over the last `[slo] window` "
           "seconds of successful requests (none exported while the window is empty):", "",
           *_rows(_slo_families()),
           "## Workers", "",
           "Kept by the router for every registered worker:", "",
           *_rows(_families(workers)),
           "Reported by the workers with each heartbeat, as declared by `WorkerGauges` "
           "(cluster/wire/gauges.py); a worker exports only those its role reports:", "",
           *_declared_rows(),
           "`pdcluster:rejected_frames_total` also counts the router's own refused handshakes, "
           "with `role=\"router\"` and `worker=\"router\"`.", ""]
    return "\n".join(out).rstrip("\n") + "\n"
