"""In-place role switch on a 2-prefill 1-decode CPU cluster: a prefill worker asked through
the admin API to become a decode worker in the middle of 16 streamed requests drains what it
holds and registers again; every request ends once with the offline engine's greedy text,
the switched worker then decodes, and every pool is empty afterwards."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster, cluster_config, reference_llm
from tests.router_harness import wait_for

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
GROUPS = """
[[prefill]]
count = 2

[[decode]]
count = 1
"""
PROMPTS = [f"Write the number {n} in words:" for n in range(16)]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config(GROUPS, scheduler="threads = 1"), "role-switch")
    yield c
    c.stop()


def reference() -> tuple[dict, object]:
    """Each prompt's greedy ids from the offline engine (what the unified worker answers)."""
    llm = reference_llm()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return {p: o.token_ids for p, o in zip(PROMPTS, outs)}, llm.tokenizer


def workers(c) -> dict:
    got = httpx.get(c.base_url + "/admin/workers", timeout=10).json()["workers"]
    return {w["worker_id"]: w for w in got}


def test_switch_mid_stream_loses_and_repeats_nothing_and_the_worker_then_decodes(cluster):
    ref, tokenizer = reference()
    first_token = threading.Event()
    pid = cluster.worker_pids()["prefill-1"]

    def stream(prompt: str):
        text, finishes = [], []
        for chunk in cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True}):
            choice = chunk.choices[0]
            if choice.text:
                text.append(choice.text)
                first_token.set()
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        return "".join(text), finishes

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [pool.submit(stream, p) for p in PROMPTS]
        assert first_token.wait(120)
        started = time.monotonic()
        resp = httpx.post(cluster.base_url + "/admin/workers/prefill-1/role", json={"role": "decode"}, timeout=10)
        assert resp.status_code == 202, resp.text
        assert resp.json()["switching_to"] == "decode"
        assert wait_for(lambda: workers(cluster).get("prefill-1", {}).get("role") == "decode", 30)
        switch_s = time.monotonic() - started
        print(f"role switch prefill-1 -> decode took {switch_s:.2f} s (request to re-registered)")
        results = [s.result(timeout=180) for s in streams]
    for prompt, (text, finishes) in zip(PROMPTS, results):
        assert finishes == ["length"], prompt                       # ended once
        assert text == tokenizer.decode(ref[prompt]), prompt         # nothing lost, nothing twice
    # in place: the same process switched on the model it had loaded (no restart, no second load);
    # how many seconds that took is the machine's business (1.7 s alone, far more on loaded CI cores)
    log = cluster.log("prefill-1")
    assert cluster.worker_pids()["prefill-1"] == pid, switch_s
    assert log.count("torch threads:") == 1 and "prefill-1: switching to decode" in log, switch_s
    assert log.index("prefill-1 (prefill) serving") < log.index("prefill-1 (decode) serving")

    before = len(cluster.iterations("prefill-1", "Decode"))
    for p in PROMPTS[:4]:                                           # round robin over both decoders
        r = cluster.client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert r.choices[0].text == tokenizer.decode(ref[p][:4])
    assert len(cluster.iterations("prefill-1", "Decode")) > before
    assert 'pdcluster:role_switches_total{from="prefill",to="decode"} 1.0' in cluster.metrics()
    assert wait_for(lambda: all(w["token_usage"] == 0 for w in workers(cluster).values()), 60), workers(cluster)


def test_a_switch_that_leaves_no_pair_is_refused(cluster):
    resp = httpx.post(cluster.base_url + "/admin/workers/prefill-0/role", json={"role": "decode"}, timeout=10)
    assert resp.status_code == 409 and "no prefill/decode pair" in resp.text
    resp = httpx.post(cluster.base_url + "/admin/workers/decode-0/role", json={"role": "dllm"}, timeout=10)
    assert resp.status_code == 400
