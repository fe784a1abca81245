"""The planner: role switches that keep the `[slo]` targets, decided from what the router
already measures (off unless `[planner] enabled`).

Every `interval` seconds it compares the SLO window's TTFT and TPOT at `percentile` (p90 by
default: SLOs are kept or missed in the tail, which a mean hides; 0 = the means) with their
targets. TTFT above (1 + hysteresis) x its target while TPOT is not above its own: prefill
is the bottleneck, so the least-loaded decode worker (one of several) becomes a prefill
worker; the mirror case moves a prefill worker to decode. When both sit below
(1 - hysteresis) x their targets (or no request finished), one worker that was moved goes
back to its configured role. Between the two bands nothing happens, and nothing happens
within `interval` of a switch or while one is under way: one move per interval, never
back and forth on noise. Every decision is logged with its inputs.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Optional

from cluster.config import ClusterConfig
from cluster.roles import SWITCHABLE_ROLES
from cluster.router.errors import APIError
from cluster.router.slo import SloWindow

log = logging.getLogger("pdcluster.router")


def _ratio(value: Optional[float], target: Optional[float]) -> Optional[float]:
    return None if value is None or target is None else value / target


class Planner:
    def __init__(self, cfg: ClusterConfig, dispatcher, slo: SloWindow,
                 clock: Callable[[], float] = time.monotonic):
        self.settings, self.targets = cfg.planner, cfg.slo
        self.dispatcher, self.slo, self.clock = dispatcher, slo, clock
        self.home = {wid: g.role for wid, g in cfg.worker_ids()}     # the configured roles
        self.last_switch = -math.inf
        self._stop = threading.Event()

    def start(self) -> "Planner":
        threading.Thread(target=self._loop, name="planner", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.interval):
            try:
                self.decide()
            except Exception:                       # the planner must never stop the router
                log.exception("planner: decision failed")

    def decide(self) -> Optional[tuple[str, str]]:
        """One decision: (worker id, new role) of the switch begun, or None."""
        now = self.clock()
        if now - self.last_switch < self.settings.interval:
            return None
        q = self.settings.percentile
        seen_ttft, seen_tpot = self.slo.percentiles(q) if q else self.slo.means()
        ttft, tpot = _ratio(seen_ttft, self.targets.ttft), _ratio(seen_tpot, self.targets.tpot)
        with self.dispatcher.lock:
            workers = list(self.dispatcher.directory.workers.values())
            if any(w.switching_to is not None for w in workers):
                return None
            move = self._choose(ttft, tpot, workers)
            if move is not None:
                try:
                    self.dispatcher.role_switches.begin(*move)
                    self.last_switch = now
                except APIError as e:
                    log.info("planner: %s -> %s refused: %s", *move, e.message)
                    move = None
        log.info("planner: %s TTFT %s, TPOT %s of target (hysteresis %g) -> %s", f"p{q:g}" if q else "mean",
                 _show(ttft), _show(tpot), self.settings.hysteresis,
                 f"switch {move[0]} to {move[1]}" if move else "no change")
        return move

    def _choose(self, ttft: Optional[float], tpot: Optional[float], workers) -> Optional[tuple[str, str]]:
        h = self.settings.hysteresis
        over = lambda r: r is not None and r > 1 + h      # noqa: E731
        under = lambda r: r is None or r < 1 - h          # noqa: E731
        by_load = sorted(workers, key=lambda w: (w.load, w.worker_id))
        prefill = [w for w in by_load if w.role == "prefill"]
        decode = [w for w in by_load if w.role == "decode"]
        if over(ttft) and not over(tpot) and len(decode) > 1:
            return decode[0].worker_id, "prefill"
        if over(tpot) and not over(ttft) and len(prefill) > 1:
            return prefill[0].worker_id, "decode"
        if under(ttft) and under(tpot):
            moved = [w for w in by_load if self.home.get(w.worker_id, w.role) != w.role
                     and self.home[w.worker_id] in SWITCHABLE_ROLES]
            if moved:
                return moved[0].worker_id, self.home[moved[0].worker_id]
        return None


def _show(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"
