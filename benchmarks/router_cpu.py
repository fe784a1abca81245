"""The router's CPU as router_stream.py reads it (psutil): per process and thread, and over the
steady window of a run (every stream under way, none finished yet)."""
from __future__ import annotations


def cpu_seconds(proc, kind: str = "both", children: bool = True) -> float:
    """User + system CPU seconds of `proc` and its children (or `kind` "system" alone)."""
    import psutil
    total = 0.0
    for p in [proc] + (proc.children(recursive=True) if children else []):
        try:
            t = p.cpu_times()
            total += t.system if kind == "system" else t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def thread_seconds(proc) -> dict:
    """User + system CPU seconds per thread of `proc` and its children, keyed "pid/main" (the
    event loop of a router or front end) or "pid/other" (I/O, liveness, tokenize threads)."""
    import psutil
    out: dict = {}
    for p in [proc] + proc.children(recursive=True):
        try:
            for t in p.threads():
                key = f"{p.pid}/{'main' if t.id == p.pid else 'other'}"
                out[key] = out.get(key, 0.0) + t.user_time + t.system_time
        except psutil.NoSuchProcess:
            pass
    return out


def per_thread(router_pid: int, before: dict, after: dict, n: int) -> dict:
    """thread_seconds' growth per unit, keyed "dispatcher/main", "frontend/other-PID"..."""
    out = {}
    for key, v in sorted(after.items()):
        pid, kind = key.split("/")
        name = f"dispatcher/{kind}" if pid == str(router_pid) else f"frontend/{kind}-{pid}"
        out[name] = round((v - before.get(key, 0.0)) / max(n, 1) * 1e6, 1)
    return out


def steady_window(marks: dict, pid: int) -> dict:
    """CPU per SSE event from the moment every stream had its first token to the first [DONE]:
    no admission, no first or last token; per token where events/token is 1.0."""
    if "STEADY" not in marks or "ENDING" not in marks or marks["ENDING"][0] <= marks["STEADY"][0]:
        return {}
    (e0, cpu0, t0), (e1, cpu1, t1) = marks["STEADY"], marks["ENDING"]
    n = e1 - e0
    return {"steady_events": n, "steady_us_per_event": round((cpu1 - cpu0) / n * 1e6, 1),
            "steady_threads_us_per_event": per_thread(pid, t0, t1, n)}
