"""DLLM requests prefilled remotely, end to end: `pdcluster launch` of one prefill worker and one
DLLM worker whose group says `prefill = "remote"`, the real default model. Block size 1 answers
the autoregressive reference; block size 4 answers what the DLLM worker answers prefilling
locally (same seed); long prompts do not enter the running requests' rounds; the request's
phases and both workers' log lines name their own iterations; a prefill worker killed during
the handoff leaves the request prefilled again (here by the DLLM worker itself), never hung."""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import signal
import statistics
import threading
import time

import httpx
import pytest

from tests.cluster_harness import LaunchedCluster, cluster_config, reference_llm

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct-dllm"
PROMPTS = ["The capital of France is", "Once upon a time"]
MAX_TOKENS = 6
GROUPS = f"""
[[prefill]]
count = 1

[[dllm]]
count = 1
model = "{MODEL}"
prefill = "remote"
block_size = 1
"""
ROUND = re.compile(r"^(\S+ \S+) dllm-0 INFO \S+: Prefill batch \[(\d+)\], #new-seq: (\d+), #new-token: (\d+)", re.M)


@pytest.fixture(scope="module")
def cluster():
    # a stopped prefill-0 (last test) must stay placeable until its request lands there, however slow the
    # machine: it leaves by its exit, which the launcher reports at once, never by 3 s of silence
    c = LaunchedCluster(cluster_config(GROUPS, extra="heartbeat_dead_after = 30.0"), "dllm-remote")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def engine():
    """The session's offline engine on the reference weights: autoregressive answers, and its
    loaded model for the in-process DLLM run with local prefill."""
    return reference_llm()


@pytest.fixture(scope="module")
def reference(engine):
    from cluster.sampling_params import SamplingParams
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    return {p: o.token_ids for p, o in zip(PROMPTS, outs)}, engine.tokenizer


def complete(cluster, prompt, **body):
    """(request id, text) of one completion through the router's HTTP API."""
    r = httpx.post(cluster.base_url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"], r.json()["choices"][0]["text"]


def phases(cluster, rid) -> dict:
    trace = httpx.get(f"{cluster.base_url}/debug/requests/{rid}", timeout=10).json()
    return trace, {p["phase"]: p for p in trace["phases"]}


def test_block_size_1_with_remote_prefill_equals_the_autoregressive_reference(cluster, reference):
    ref, tok = reference
    rid, text = complete(cluster, PROMPTS[1])
    assert text == tok.decode(ref[PROMPTS[1]])
    # the prompt ran on prefill-0 in its own batch, its KV went to dllm-0: each names its iteration
    trace, by_phase = phases(cluster, rid)
    assert trace["route"] == "dllm_remote"
    prefilled, received = by_phase["prefill_forward"], by_phase["kv_transfer"]
    assert prefilled["worker"] == "prefill-0" and received["worker"] == "dllm-0"
    n = prefilled["forward_iter"]
    assert received["src_forward_iter"] == n and received["bytes"] > 0
    assert n in cluster.iterations("prefill-0", "Prefill")
    assert re.search(rf"KV from prefill-0 batch \[{n}\]", cluster.log("dllm-0"))
    rounds = cluster.iterations("dllm-0", "Prefill")
    assert rounds and rounds == sorted(set(rounds))


def test_block_size_4_with_remote_prefill_equals_local_prefill_with_the_same_seed(cluster, engine):
    from cluster.engine.model_runner import ModelRunner
    from cluster.dllm_params import DllmParams
    from dllm.model_spec import DllmModelSpec
    from tests.dllm_runs import run_dllm
    body = {"temperature": 0.8, "seed": 11, "max_tokens": 8}
    prompt = PROMPTS[1]
    _, remote = complete(cluster, prompt, block_size=4, **body)
    tok = engine.tokenizer
    runner = ModelRunner(engine.loaded, num_pages=64, page_size=16)
    spec = DllmModelSpec.causal(min(tok.eos_token_ids))          # the worker's, for these weights
    control, _ = run_dllm(runner, [("r0", tok.encode(prompt), body, {})], DllmParams(block_size=4), spec=spec)
    assert remote == tok.decode(control.outputs()["r0"])


def test_long_prompts_prefilled_remotely_stay_out_of_the_running_requests_rounds(cluster):
    log_before = len(cluster.log("dllm-0"))
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 30)   # ~270 tokens
    running = ["Count: 1, 2, 3,", "The alphabet: a, b, c,"]
    with cf.ThreadPoolExecutor(3) as pool:
        steady = [pool.submit(complete, cluster, p, max_tokens=12, ignore_eos=True) for p in running]
        time.sleep(0.5)
        burst = pool.submit(complete, cluster, long_prompt, max_tokens=2)
        for f in steady + [burst]:
            f.result(timeout=300)
    rounds = [(m.group(1), int(m.group(3)), int(m.group(4)))
              for m in ROUND.finditer(cluster.log("dllm-0")[log_before:])]
    assert len(rounds) >= 8
    # per request a round carries its block, the block committed before it (now final) and, for
    # a shifted model, the last token before that: never a prompt
    assert all(num_tokens <= num_seqs * 3 for _, num_seqs, num_tokens in rounds), rounds
    gaps = step_times([t for t, _, _ in rounds])
    assert max(gaps) < 1.0 + 5 * statistics.median(gaps), gaps   # no round waited for a long prompt


def num_inflight(cluster, worker_id: str) -> int:
    """The router's count of requests placed on `worker_id` and not done (0 once it is gone)."""
    got = httpx.get(cluster.base_url + "/admin/workers", timeout=10).json()["workers"]
    return next((w["num_inflight"] for w in got if w["worker_id"] == worker_id), 0)


def step_times(stamps: list[str]) -> list[float]:
    import datetime
    ts = [datetime.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f").timestamp() for s in stamps]
    return [b - a for a, b in zip(ts, ts[1:])]


def test_prefill_worker_killed_during_the_handoff_leaves_the_request_prefilled_again(cluster, reference):
    ref, tok = reference
    pid = cluster.worker_pids()["prefill-0"]
    os.kill(pid, signal.SIGSTOP)                     # it takes the request and never answers
    got = {}
    t = threading.Thread(target=lambda: got.update(answer=complete(cluster, PROMPTS[0])))
    try:
        t.start()
        # placed on the pair, seen by the router itself (a 1 s sleep only hoped so: on loaded cores the
        # request can still be on its way, then it goes to dllm-0 alone and nothing is redispatched)
        deadline = time.monotonic() + 60
        while num_inflight(cluster, "prefill-0") < 1:
            assert t.is_alive() and time.monotonic() < deadline, "the request was never placed on prefill-0"
            time.sleep(0.05)
    finally:
        os.kill(pid, signal.SIGKILL)                 # the launcher reports the exit at once
    t.join(timeout=120)
    assert not t.is_alive(), "the request hung"
    rid, text = got["answer"]
    assert text == tok.decode(ref[PROMPTS[0]])
    trace, by_phase = phases(cluster, rid)
    assert any(e["name"] == "redispatch" and "prefill-0" in e["reason"] for e in trace["events"]), trace
    assert trace["status"] == "success"
