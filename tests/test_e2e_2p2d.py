"""Two prefill + two decode workers: both pairs serve, a small decode pool retracts and
still completes every request, and a decode worker killed mid-stream is resumed on the
other one without the client noticing (greedy text equals the offline engine's)."""
import concurrent.futures as cf
import os
import re
import signal

import psutil
import pytest

from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster, cluster_config, reference_llm

pytestmark = pytest.mark.integration

GROUPS = """
[[prefill]]
count = 2

[[decode]]
count = 2
num_pages = 20          # 320 tokens per decode worker: small on purpose, to force retraction
"""


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config(GROUPS, scheduler='page_size = 16',
                                       extra="\n[recovery]\nresume_on_decode_failure = true\n"), "2p2d")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def llm():
    return reference_llm()


def test_small_decode_pools_retract_and_every_request_completes(cluster, llm):
    prompts = [f"Write a list of {n} fruits:" for n in range(3, 15)]   # 12 requests of 4 pages
    ref = llm.generate(prompts, SamplingParams(max_tokens=48, ignore_eos=True))

    def one(p):
        return cluster.client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=48,
                                                 temperature=0, extra_body={"ignore_eos": True})

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, prompts))
    for r, out in zip(results, ref):
        assert r.choices[0].finish_reason == "length"
        assert r.choices[0].text == out.text
    retracted = sum(int(float(v)) for v in re.findall(
        r'pdcluster:num_retracted_reqs_total\{[^}]*role="decode"[^}]*\} (\S+)', cluster.metrics()))
    retract_lines = cluster.log("decode-0").count("retracting") + cluster.log("decode-1").count("retracting")
    assert retract_lines >= 1 and retracted >= 1


def test_both_pairs_serve_traffic(cluster):
    for wid, kind in (("prefill-0", "Prefill"), ("prefill-1", "Prefill"),
                      ("decode-0", "Decode"), ("decode-1", "Decode")):
        iters = cluster.iterations(wid, kind)
        assert iters, f"{wid} served nothing"
        assert iters == sorted(set(iters)), wid


def worker_pids(cluster, worker_id):
    return [p.pid for p in psutil.Process(cluster.proc.pid).children(recursive=True)
            if f"--worker-id {worker_id}" in " ".join(p.cmdline())]


def test_decode_death_mid_stream_resumes_on_the_other_decode_worker(cluster, llm):
    prompt = "Count from one to fifty: one, two, three,"
    ref = llm.generate([prompt], SamplingParams(max_tokens=120, ignore_eos=True))[0].text
    before = {w: len(cluster.iterations(w, "Decode")) for w in ("decode-0", "decode-1")}
    stream = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt, max_tokens=120,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
    pieces, killed = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if len(pieces) == 10 and killed is None:
            # the decode worker that is streaming is the one whose log is growing
            now = {w: len(cluster.iterations(w, "Decode")) for w in before}
            killed = max(now, key=lambda w: now[w] - before[w])
            for pid in worker_pids(cluster, killed):
                os.kill(pid, signal.SIGKILL)
    assert killed is not None
    assert "".join(pieces) == ref
