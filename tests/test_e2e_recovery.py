"""Worker death mid-stream: with resume off the stream fails and the client raises; the
launcher restarts the worker and the cluster serves again."""
import os
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
                                       extra="\n[recovery]\nrestart_workers = true\nresume_on_decode_failure = false\n"),
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
        time.sleep(1)
    pytest.fail("cluster did not recover:\n" + cluster.output())
