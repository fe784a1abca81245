"""A unified worker of three tensor-parallel ranks (gloo) through `pdcluster launch`: greedy text
equal to the unsplit offline engine, one worker to the router, rank log lines named `worker/rank`,
and a rank's death restarts the worker whole with no process left behind. The worker runs with
`tp_invariant` (float64 row-parallel sums), which every rank must load alike."""
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from cluster.engine.loader import TP_INVARIANT_NOTE
from tests.cluster_harness import LaunchedCluster, cluster_config, offline_greedy
from tests.test_e2e_local import PROMPTS

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 8
NUM_PROMPTS = 2


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[unified]]\ncount = 1\ntp = 3\n", model="tp_invariant = true",
                                       extra="\n[recovery]\nrestart_workers = true\n"), "tp")
    yield c
    c.stop()


def rank_pids(cluster) -> dict[int, int]:
    """rank -> pid of unified-0's live processes (rank 0 is the worker process)."""
    return {rank: pid for (wid, rank), pid in cluster.rank_pids().items() if wid == "unified-0"}


def test_tp3_unified_greedy_equals_the_unsplit_engine(cluster):
    ref, tok = offline_greedy(PROMPTS[:NUM_PROMPTS], MAX_TOKENS)
    for prompt, ids in ref.items():
        r = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == tok.decode(ids, skip_special_tokens=True), prompt


def test_sampled_requests_are_served_by_all_ranks(cluster):
    """Not greedy: rank 0 samples and the others take its tokens (their futures must agree)."""
    r = cluster.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                          temperature=0.8, seed=7, n=1)
    assert r.choices[0].text


def test_ranks_log_under_worker_slash_rank_and_all_load_tp_invariant(cluster):
    assert sorted(rank_pids(cluster)) == [0, 1, 2]
    for rank in (1, 2):
        with open(os.path.join(cluster.log_dir, f"unified-0.rank{rank}.log")) as f:
            log = f.read()
        assert f"unified-0/{rank} INFO" in log and TP_INVARIANT_NOTE in log
    with open(os.path.join(cluster.log_dir, "unified-0.log")) as f:
        assert TP_INVARIANT_NOTE in f.read()


def test_killed_rank_restarts_the_worker_whole(cluster):
    before = rank_pids(cluster)
    os.kill(before[2], signal.SIGKILL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        now = rank_pids(cluster)
        if sorted(now) == [0, 1, 2] and not set(now.values()) & set(before.values()):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker not restarted whole: {before} -> {rank_pids(cluster)}\n{cluster.output()}")
    while time.monotonic() < deadline:
        try:
            if httpx.get(cluster.base_url + "/health", timeout=5).status_code == 200:
                r = cluster.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
                assert r.choices[0].text
                return
        except (openai.APIError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    pytest.fail("worker did not serve again:\n" + cluster.output())


def test_stop_leaves_no_rank_behind(cluster):
    cluster.descendants = psutil.Process(cluster.proc.pid).children(recursive=True)
    assert len(rank_pids(cluster)) == 3
    assert cluster.stop() == []
