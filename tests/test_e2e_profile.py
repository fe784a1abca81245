"""`pdcluster profile`: a cluster launched from a config, timed through the router's phases,
written as a profile that `pdcluster plan` reads."""
import json
import time

import pytest

from cluster.launch.cli import main
from cluster.plan.costs import CostModel

pytestmark = pytest.mark.integration

CONFIG = """
[scheduler]
num_pages = 128
threads = 1
[[prefill]]
count = 1
[[decode]]
count = 1
"""


def test_profile_measures_prefill_decode_and_transfer_and_plan_reads_it(tmp_path, capsys):
    config, out = tmp_path / "pd.toml", tmp_path / "profile.json"
    config.write_text(CONFIG)
    started = time.monotonic()
    assert main(["profile", str(config), "--out", str(out), "--prefill-tokens", "8,32",
                 "--batches", "1,2", "--contexts", "8", "--decode-tokens", "4", "--repeats", "1"]) == 0
    assert time.monotonic() - started < 120                   # a loaded 2-core box; alone ~30 s
    profile = json.loads(out.read_text())
    assert [n for n, _ in profile["prefill"]] == [8, 32] and all(s > 0 for _, s in profile["prefill"])
    assert [b for b, _, _ in profile["decode"]] == [1, 2] and all(s > 0 for *_, s in profile["decode"])
    # the default model's KV: 30 layers x 3 KV heads x 64 dims x (K + V) x 4 bytes a token
    assert profile["kv_bytes_per_token"] == 30 * 3 * 64 * 2 * 4
    assert profile["transfer"][1][0] == 32 * profile["kv_bytes_per_token"]
    assert CostModel.from_profile(profile).prefill(32) > 0
    assert set(profile["co_run"]) == {"prefill", "decode"} and min(profile["co_run"].values()) >= 1.0
    assert main(["plan", "--profile", str(out), "--gpus", "2", "--slo-ttft", "60", "--slo-tpot", "5"]) == 0
    assert "best:" in capsys.readouterr().out
