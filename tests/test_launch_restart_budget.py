"""The launcher's restart budget: backoff grows, and a worker that stays up gets it back."""
from __future__ import annotations

import sys
import time

from cluster.config import config_from_dict
from cluster.launch.child_process import Child, stop_processes
from cluster.launch.launcher import MAX_BACKOFF_S, restart_backoff


def test_restart_backoff_doubles_up_to_a_ceiling():
    assert [restart_backoff(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert restart_backoff(50) == MAX_BACKOFF_S


def test_restart_budget_renews_only_after_running_healthy_long_enough(tmp_path):
    c = Child("prefill-0", [sys.executable, "-c", "import time; time.sleep(30)"], {},
              str(tmp_path / "prefill-0.log"))
    c.spawn()
    try:
        c.num_restarts = 3
        assert not c.renew_restart_budget(time.monotonic(), healthy_after=60)
        assert c.num_restarts == 3
        assert c.renew_restart_budget(time.monotonic() + 61, healthy_after=60)
        assert c.num_restarts == 0
    finally:
        stop_processes([c.proc], 5)
    c.num_restarts = 2                       # an exited process is not healthy
    assert not c.renew_restart_budget(time.monotonic() + 1000, healthy_after=60)
    assert c.num_restarts == 2


def test_hardening_keys_have_their_defaults():
    cfg = config_from_dict({})
    assert cfg.router.max_body_bytes == 8 << 20
    assert cfg.router.metrics_require_key is False
    assert cfg.timeouts.router_lost == 30
    assert cfg.recovery.restart_reset_after == 60
    assert (cfg.security.curve, cfg.security.keys_dir) == ("auto", "")
