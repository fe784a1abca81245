"""A process's startup objects, moved out of the cyclic collector's way; long collections logged.

A router holds ~200k container objects from its imports, tokenizers and app before it serves
one request (a worker more, with torch); they live until exit. Each full collection walks
them all again: measured in the router during a 256-request burst on a loaded 2-core VM,
passes of up to 1 s, 0.3-1.2 s per burst, while the event loop and the control thread stood
still. `gc.freeze()` moves them to the permanent generation, which is never scanned, so the
collector only sees what serving allocates (vLLM freezes its engine's startup heap too).

`PDCLUSTER_GC_WARN_MS=N` (as SGLang's `--gc-warning-threshold-secs`): every collection that
holds the process for N ms or more is logged as a warning, with its generation and what it
freed, so a stall that no phase explains can be told apart from a collection.
"""
from __future__ import annotations

import gc
import logging
import os
import time

GC_WARN_ENV = "PDCLUSTER_GC_WARN_MS"

log = logging.getLogger("pdcluster.gc")


def freeze_startup_heap() -> None:
    """Call once, when startup is done and before serving: later garbage is still collected."""
    gc.collect()        # NOTE: first: frozen garbage would never be freed
    gc.freeze()
    raw = os.environ.get(GC_WARN_ENV, "").strip()
    if raw:
        try:
            watch_collections(float(raw) / 1e3)
        except ValueError:
            log.warning("%s=%r is not a number of milliseconds: collections are not watched", GC_WARN_ENV, raw)


def watch_collections(threshold_s: float) -> None:
    """Log every collection of at least `threshold_s` (a gc callback; the collector calls it with the
    GIL held, so its own cost is two clock reads)."""
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        held = time.perf_counter() - started[0]
        if held >= threshold_s:
            log.warning("gc generation %d held the process %.1f ms (%d collected, %d uncollectable)",
                        info.get("generation", -1), 1e3 * held, info.get("collected", 0),
                        info.get("uncollectable", 0))
    gc.callbacks.append(on_gc)
