"""The planner on scripted workers (1 prefill, 2 decode): a TTFT above its target moves a
decode worker to prefill, a calm window moves it back, and latencies inside the hysteresis
band, or a decision within the interval, move nothing."""
from dataclasses import replace

import pytest

from cluster.config import PlannerConfig, SloConfig
from cluster.router.planner import Planner
from cluster.router.slo import SloWindow
from cluster.wire import protocol
from tests.router_harness import MODEL, register_again, wait_for


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def cluster(make_router):
    r = make_router()
    workers = {wid: r.worker(wid, role, MODEL) for wid, role in
               (("prefill-0", "prefill"), ("decode-0", "decode"), ("decode-1", "decode"))}
    assert wait_for(lambda: len(r.dispatcher.directory.workers) == 3)
    clock = Clock()
    slo = SloConfig(ttft=1.0, tpot=0.05, window=30.0)
    groups = tuple(replace(g, count=n) for g, n in zip(r.cfg.groups, (1, 2)))
    cfg = replace(r.cfg, slo=slo, groups=groups,
                  planner=PlannerConfig(enabled=True, interval=10.0, hysteresis=0.2))
    window = SloWindow(slo, clock)
    return r, workers, Planner(cfg, r.dispatcher, window, clock), window, clock


def finish_switch(r, worker, role):
    assert wait_for(lambda: any(isinstance(m, protocol.RoleSwitch) and m.role == role for m in worker.received))
    register_again(worker, role)
    assert wait_for(lambda: r.dispatcher.directory.workers[worker.worker_id].role == role
                    and r.dispatcher.directory.workers[worker.worker_id].switching_to is None)


def test_slow_first_tokens_move_a_decode_worker_to_prefill_and_calm_moves_it_back(cluster):
    r, workers, planner, window, clock = cluster
    for _ in range(10):
        window.observe(2.0, 0.01)                       # TTFT 200% of target, TPOT 20%
    assert planner.decide() == ("decode-0", "prefill")
    assert planner.decide() is None                     # a switch under way
    finish_switch(r, workers["decode-0"], "prefill")
    clock.now += 5
    window.observe(3.0, 0.01)
    assert planner.decide() is None                     # within the interval of the last switch
    clock.now += 40                                      # the slow requests leave the window
    for _ in range(10):
        window.observe(0.5, 0.01)
    assert planner.decide() == ("decode-0", "decode")   # back to the configured role
    finish_switch(r, workers["decode-0"], "decode")
    clock.now += 11
    assert planner.decide() is None                     # configured layout, calm: stays


def test_latencies_inside_the_hysteresis_band_never_switch(cluster):
    r, workers, planner, window, clock = cluster
    for step in range(6):
        window.observe(1.15 if step % 2 else 0.85, 0.05)   # around the target, within +-20%
        clock.now += 11
        assert planner.decide() is None
    assert all(not any(isinstance(m, protocol.RoleSwitch) for m in w.received) for w in workers.values())


def test_slow_decode_steps_move_a_prefill_worker_only_when_one_would_remain(cluster):
    r, workers, planner, window, clock = cluster
    window.observe(0.2, 0.2)                              # TPOT 400%: but a single prefill worker
    assert planner.decide() is None


def test_the_planner_needs_an_slo_target():
    from cluster.config import ConfigError, config_from_dict
    with pytest.raises(ConfigError, match="planner.enabled"):
        config_from_dict({"planner": {"enabled": True}})
    assert config_from_dict({"planner": {"enabled": True}, "slo": {"ttft": 1.0}}).planner.enabled


def test_a_slow_tail_the_mean_hides_moves_a_worker_at_the_p90(cluster):
    r, workers, planner, window, clock = cluster
    for i in range(10):                                   # mean TTFT 0.95 s (95%), p90 2.0 s (200%)
        window.observe(2.0 if i < 3 else 0.5, 0.01)
    assert window.means()[0] == pytest.approx(0.95) and window.percentiles(90) == (2.0, 0.01)
    assert window.percentiles(50) == (0.5, 0.01) and window.percentiles(100)[0] == 2.0
    planner.settings = replace(planner.settings, percentile=0)
    assert planner.decide() is None                       # by the mean: inside the band
    planner.settings = replace(planner.settings, percentile=90)
    assert planner.decide() == ("decode-0", "prefill")
