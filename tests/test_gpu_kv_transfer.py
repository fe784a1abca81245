"""On two GPUs of one host (skips without them): `cuda_ipc` and `nccl` hand the KV off device to
device and give the greedy tokens of a unified worker with the same dummy weights, and a
killed decode worker frees the prefill side's pages held for it (the prefill keeps serving,
the restarted decode maps its pool again).

PDCLUSTER_GPU_REHEARSAL=1 runs the same module on the CPU with `shm` and `zmq` (no GPUs), so
the GPU run is rehearsed end to end first. PDCLUSTER_TEST_MODEL_DIR: a dummy model directory
(benchmarks/dummy_model.py --preset tiny-llama); default: written here from the default GGUF.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import Cluster, metric_values  # noqa: E402

REHEARSAL = os.environ.get("PDCLUSTER_GPU_REHEARSAL") == "1"
ON_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ON_GPUS or REHEARSAL), reason="needs two CUDA GPUs")]
BACKENDS = ["shm", "zmq"] if REHEARSAL else ["cuda_ipc", "nccl"]
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Roses are red,"]
MAX_TOKENS = 16
MODEL = "tiny-llama"


def model_dir() -> str:
    path = os.environ.get("PDCLUSTER_TEST_MODEL_DIR")
    if path:
        return os.path.abspath(path)
    from dummy_model import write_model_dir
    return write_model_dir(os.path.join(tempfile.mkdtemp(prefix="pdcluster-tiny-"), MODEL), "tiny-llama")


def config(groups: str, backend: str = "auto", layerwise: bool = False) -> str:
    device, dtype = ("cpu", "float32") if REHEARSAL else ("cuda", "bfloat16")
    return f"""
[model]
name = "{MODEL}"
path = "{model_dir()}"
load_format = "dummy"
dtype = "{dtype}"
device = "{device}"

[scheduler]
num_pages = 256

[timeouts]
register = 300
decode_ready = 10
kv_transfer = 5

[kv_transfer]
backend = "{backend}"
verify = true
layerwise = {str(layerwise).lower()}

{groups}
"""


def gpu_groups(*roles_gpus) -> str:
    return "\n".join(f"[[{role}]]\n" + ("" if REHEARSAL else f"gpus = [{gpu}]\n") for role, gpu in roles_gpus)


def complete(c: Cluster, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    r = httpx.post(c.base_url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def texts(c: Cluster) -> list:
    return [complete(c, p) for p in PROMPTS]      # one at a time: the same batches as the reference


@pytest.fixture(scope="module")
def reference():
    with Cluster(config(gpu_groups(("unified", 0))), "ref-unified") as c:
        return texts(c)


@pytest.fixture(scope="module")
def clusters():
    launched: dict[str, Cluster] = {}

    def get(backend: str, layerwise: bool = False) -> Cluster:
        if (backend, layerwise) not in launched:
            for key in list(launched):            # one cluster at a time: the CPU rehearsal runs on 2 cores
                launched.pop(key).stop()
            launched[backend, layerwise] = Cluster(config(gpu_groups(("prefill", 0), ("decode", 1)), backend, layerwise),
                                                   f"pd-{backend}{'-layerwise' if layerwise else ''}")
        return launched[backend, layerwise]
    yield get
    for c in launched.values():
        c.stop()


# Ordered so the last case's cluster (BACKENDS[0], whole) is the one the killed-decode test reuses.
@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "whole"])
@pytest.mark.parametrize("backend", BACKENDS[::-1])
def test_backend_gives_the_unified_workers_greedy_tokens(clusters, reference, backend, layerwise):
    c = clusters(backend, layerwise)
    assert texts(c) == reference
    deadline = time.monotonic() + 10                  # gauges arrive with the next heartbeat
    while time.monotonic() < deadline:
        sent = metric_values(c.metrics(), "pdcluster:kv_transfer_bytes_total")
        if any('worker="decode-0"' in k and v > 0 for k, v in sent.items()):
            break
        time.sleep(0.5)
    assert any('worker="decode-0"' in k and v > 0 for k, v in sent.items()), sent
    assert not any(v for v in metric_values(c.metrics(), "pdcluster:kv_transfer_failures_total").values())


def test_killed_decode_frees_the_prefill_pages_and_its_restart_serves(clusters, reference):
    c = clusters(BACKENDS[0])
    pids = {}
    for p in psutil.Process(c.proc.pid).children(recursive=True):
        cmd = p.cmdline()
        if "--worker-id" in cmd:
            pids[cmd[cmd.index("--worker-id") + 1]] = p.pid
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(lambda i=i: _try(lambda: complete(c, PROMPTS[i % 4] * 20, 400))) for i in range(6)]
        time.sleep(1.0)
        os.kill(pids["decode-0"], signal.SIGKILL)
        [f.result(timeout=180) for f in futures]           # each completes (resumed) or errors; none hangs
    deadline = time.monotonic() + 60
    usage = None
    while time.monotonic() < deadline:
        usage = metric_values(c.metrics(), "pdcluster:token_usage")
        prefill = [v for k, v in usage.items() if 'worker="prefill-0"' in k]
        if prefill and prefill[0] == 0:
            break
        time.sleep(0.5)
    assert prefill == [0], usage
    assert psutil.pid_exists(pids["prefill-0"])              # the prefill worker kept serving
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:                        # the launcher restarts decode-0
        got = _try(lambda: complete(c, PROMPTS[0]))
        if got == reference[0]:
            return
        time.sleep(1.0)
    pytest.fail(f"no answer from the restarted decode worker: {got}")


def _try(fn):
    try:
        return fn()
    except (AssertionError, httpx.HTTPError) as e:
        return e
