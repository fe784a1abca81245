"""One OpenMP team per CPU worker process: the forward thread's.

libgomp (torch's OpenMP on Linux) gives every thread that opens a parallel region its own team
of pool threads. Once a process holds more such threads than there are cores, libgomp makes
them all sleep after ~100 spins instead of spinning a while, so every parallel region (about
120 per decode step) waits for a sleeping thread to be woken. A worker whose main thread loaded
the model (one team) and whose forward thread runs the forwards (a second) crosses that line on
2 cores: its forwards ran 1.6x slower than the same forwards in a process with one team
(BENCHMARKS.md, "CPU threads"). So the model loads on a short-lived thread, whose team ends
with it; the main thread keeps one torch thread (it opens no team) and the forward thread gets
the worker's threads (ForwardExecutor). How long the forward team spins is libgomp's
`GOMP_SPINCOUNT`, which the launcher sets for workers (launcher.worker_env).
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")

LOAD_TIMEOUT_S = 3600.0   # a load that takes longer is a hang


def load_off_main_thread(load: Callable[[], T]) -> T:
    """`load()` on a thread that ends when it returns (taking its OpenMP team along); its result,
    or its exception re-raised. Then this (the main) thread drops to one torch thread."""
    import torch
    out: list = []

    def run():
        try:
            out.append((True, load()))
        except BaseException as e:   # noqa: BLE001 - re-raised on the calling thread
            out.append((False, e))
    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    thread.join(LOAD_TIMEOUT_S)
    if not out:
        raise TimeoutError(f"model load did not finish within {LOAD_TIMEOUT_S:.0f} s")
    torch.set_num_threads(1)
    ok, value = out[0]
    if not ok:
        raise value
    return value
