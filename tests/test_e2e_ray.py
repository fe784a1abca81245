"""`pdcluster launch configs/local.toml --backend ray`: a local single-node Ray (started by the
launcher with the machine's CPUs, no dashboard), each worker a Ray actor. Greedy output
equals the offline engine, which test_e2e_local shows the local launcher equals; Ray
restarts a killed worker actor and the router sees it register again; shutdown leaves no
Ray or worker process behind. CURVE is forced on, so the planes authenticate across actors."""
import os
import re
import signal
import time

import psutil
import pytest

from tests.cluster_harness import REFERENCE_WEIGHTS, LaunchedCluster, offline_greedy, repo_config

pytest.importorskip("ray", reason="install the ray extra: pip install -e '.[ray]'")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):"]
MAX_TOKENS = 12
MODEL, DLLM_MODEL = "smollm2-135m-instruct", "smollm2-135m-instruct-dllm"
REGISTERED = re.compile(r"registered (\S+) \(role=\S+ model=\S+ pid=(\d+)")


@pytest.fixture(scope="module")
def cluster():
    # CURVE on although everything is on loopback: the keys must reach every actor
    c = LaunchedCluster(repo_config("local", REFERENCE_WEIGHTS), "ray", env={"PDCLUSTER_CURVE": "on"}, args=("--backend", "ray"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def reference():
    ids, tokenizer = offline_greedy(PROMPTS, MAX_TOKENS)
    return {p: tokenizer.decode(ids[p]) for p in PROMPTS}


def registrations(cluster) -> list[tuple[str, int]]:
    return [(m.group(1), int(m.group(2))) for m in REGISTERED.finditer(cluster.log("router"))]


def family(cluster) -> list[psutil.Process]:
    return psutil.Process(cluster.proc.pid).children(recursive=True)


def complete(cluster, prompt, model=MODEL) -> str:
    r = cluster.client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                          temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_ray_cluster_greedy_output_equals_the_offline_engine(cluster, reference):
    for prompt in PROMPTS:
        assert complete(cluster, prompt) == reference[prompt]
    # the DLLM worker at block size 1 reproduces autoregressive greedy decoding
    assert complete(cluster, PROMPTS[0], DLLM_MODEL) == reference[PROMPTS[0]]


def test_every_worker_runs_as_the_child_of_its_ray_actor(cluster):
    for wid, pid in registrations(cluster):
        parent = psutil.Process(pid).parent()
        assert parent.name().startswith("ray::") or "WorkerProcess" in " ".join(parent.cmdline()), wid
        assert f"--worker-id {wid}" in " ".join(psutil.Process(pid).cmdline())
    assert sorted(w for w, _ in registrations(cluster)) == ["decode-0", "dllm-0", "prefill-0"]


def test_each_actor_holds_the_cluster_curve_keys_privately(cluster):
    with open(os.path.join(cluster.log_dir, "keys", "cluster.key")) as f:
        public = f.read()
    for wid in ("prefill-0", "decode-0", "dllm-0"):
        keys_dir = os.path.join(cluster.log_dir, f"ray-{wid}-keys")
        assert os.stat(keys_dir).st_mode & 0o077 == 0
        assert os.stat(os.path.join(keys_dir, "cluster.key_secret")).st_mode & 0o077 == 0
        with open(os.path.join(keys_dir, "cluster.key")) as f:
            assert f.read() == public


def test_killed_worker_actor_is_restarted_by_ray_and_registers_again(cluster, reference):
    (old_pid,) = [pid for wid, pid in registrations(cluster) if wid == "decode-0"]
    actor = psutil.Process(old_pid).parent()
    actor.send_signal(signal.SIGKILL)              # the actor process, not the worker
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pids = [pid for wid, pid in registrations(cluster) if wid == "decode-0"]
        if len(pids) == 2:
            break
        time.sleep(0.5)
    else:
        pytest.fail("decode-0 did not register again:\n" + cluster.log("router")[-3000:])
    assert pids[1] != old_pid
    try:                                           # the old worker died with its actor
        psutil.Process(old_pid).wait(30)
    except psutil.NoSuchProcess:
        pass
    new_actor = psutil.Process(pids[1]).parent()
    assert new_actor.pid != actor.pid
    deadline = time.monotonic() + 60              # until the router has dropped the old one
    while True:
        try:
            assert complete(cluster, PROMPTS[1]) == reference[PROMPTS[1]]
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_shutdown_leaves_no_ray_or_worker_process(cluster):
    procs = family(cluster)
    names = " ".join(p.name() for p in procs)
    assert "raylet" in names and "gcs_server" in names
    starts = {w: cluster.log(w).count("torch threads:") for w in ("prefill-0", "decode-0", "dllm-0")}
    t0 = time.monotonic()
    alive = cluster.stop()                         # SIGTERM to the launcher (the Ray driver)
    assert cluster.proc.returncode == 0, cluster.output()
    gone, still = psutil.wait_procs(procs, timeout=30)
    leftovers = [f"{p.pid} {p.name()}" for p in still if p.status() != psutil.STATUS_ZOMBIE]
    for p in still:
        p.kill()
    assert not leftovers and not alive, f"left behind: {leftovers}"
    assert time.monotonic() - t0 < 60
    # workers the router's drain stopped were not restarted by Ray on the way out
    assert {w: cluster.log(w).count("torch threads:") for w in starts} == starts
