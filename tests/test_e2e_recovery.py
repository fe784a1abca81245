"""Worker death mid-stream: with resume off the stream fails and the client raises; the
launcher restarts the worker and the cluster serves again. A prefill worker that stalls
(SIGSTOP) under an `[slo]`: the decode worker prefills new requests itself, token for token
as the pair answered them."""
import concurrent.futures as cf
import os
import re
import signal
import time

import httpx
import openai
import psutil
import pytest

from tests.cluster_harness import LaunchedCluster, cluster_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[prefill]]\ncount = 1\n\n[[decode]]\ncount = 1\n",
                                       extra="\n[recovery]\nrestart_workers = true\nresume_on_decode_failure = false\n"
                                             "\n[slo]\nttft = 1.0\ntpot = 0.5\n"),
                        "recovery")
    yield c
    c.stop()


def worker_pid(cluster, worker_id):
    for p in psutil.Process(cluster.proc.pid).children(recursive=True):
        if worker_id in " ".join(p.cmdline()):
            return p.pid
    raise LookupError(worker_id)


def test_decode_death_mid_stream_makes_the_client_raise(cluster):
    stream = cluster.client.completions.create(model="smollm2-135m-instruct", prompt="Count: 1, 2, 3,",
                                               max_tokens=400, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
    got = 0
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got += 1
            if got == 3:
                os.kill(worker_pid(cluster, "decode-0"), signal.SIGKILL)
    assert got >= 3


def test_killed_worker_is_restarted_and_serves_again(cluster):
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if httpx.get(cluster.base_url + "/health", timeout=5).status_code == 200:
            try:
                r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt="Hello",
                                                      max_tokens=4, temperature=0)
                assert r.choices[0].text
                return
            except openai.APIError:
                pass
        time.sleep(0.2)
    pytest.fail("cluster did not recover:\n" + cluster.output())


STALL_PROMPTS = ["The capital of France is", "Once upon a time", "Water boils at"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout_s} s")


def test_stalled_prefill_worker_makes_decode_prefill_new_requests_itself(cluster):
    def complete(prompt: str) -> tuple[str, int]:
        r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=6,
                                              temperature=0)
        return r.choices[0].text, r.usage.prompt_tokens
    wait_for(lambda: httpx.get(cluster.base_url + "/health", timeout=5).status_code == 200, 180, "healthy")
    with cf.ThreadPoolExecutor(len(STALL_PROMPTS)) as pool:
        # through the pair, which answers as the offline engine does (test_e2e_local.py); meanwhile
        # decode measures its steps and prefill its rate
        ref = list(pool.map(complete, STALL_PROMPTS))
    prefill = worker_pid(cluster, "prefill-0")
    os.kill(prefill, signal.SIGSTOP)
    try:
        # no heartbeat for heartbeat_dead_after: gone from the worker directory, nothing is predicted to
        # prefill in time any more; the cluster stays healthy, degraded: decode prefills itself
        health = wait_for(lambda: (h := httpx.get(cluster.base_url + "/health", timeout=5)).json()["workers"]
                          ["prefill"] == 0 and h, 60, "prefill-0 declared dead")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        with cf.ThreadPoolExecutor(len(STALL_PROMPTS)) as pool:
            assert list(pool.map(complete, STALL_PROMPTS)) == ref
        assert len(re.findall(r"decode-side prefill: request \S+ on decode-0", cluster.log("router"))) >= 3
        counted = re.compile(r'pdcluster:decode_side_prefill_tokens_total\{role="decode",worker="decode-0"\} (\S+)')
        num_prompt_tokens = sum(n for _, n in ref)            # the gauges come with the next heartbeat
        wait_for(lambda: (m := counted.search(cluster.metrics())) and float(m.group(1)) >= num_prompt_tokens, 60,
                 "decode_side_prefill_tokens_total counting the prompts")
        for taken, budget in re.findall(r"Mixed step \[\d+\]: .*#prefill-token: (\d+), chunk budget: (\d+)",
                                        cluster.log("decode-0")):
            assert int(taken) <= int(budget)
    finally:
        os.kill(prefill, signal.SIGCONT)
