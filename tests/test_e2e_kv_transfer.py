"""KV transfer backends end to end (real processes, the real default model): `auto` picks
`shm` for CPU workers on one host, `zmq` moves the bytes as frames, both give the greedy
text of the offline engine (the unified worker's engine), and with the test-only fault
switch corrupting transfers, decode catches every bad checksum, the request is prefilled
again, the client still gets the reference text, and the failures are counted. With
`layerwise = true` (each layer sent as the forward computes it) zmq and shm give the same text."""
import concurrent.futures as cf
import re

import pytest

from cluster.kv_transfer import FAULT_ENV
from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster, cluster_config, reference_llm

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at",
           "Roses are red,", "1, 2, 3, 4,"]
MAX_TOKENS = 12
GROUPS = "[[prefill]]\n[[decode]]\n"
# seed 6 at 0.4 corrupts transfers 4, 5, 9, 11, ...: never three in a row, so with requests
# sent one at a time every request lands within MAX_KV_ATTEMPTS
FAULTS = "corrupt=0.4,seed=6"


def launch(backend: str, name: str, env=None, layerwise: bool = False) -> LaunchedCluster:
    config = cluster_config(GROUPS) + (f'\n[kv_transfer]\nbackend = "{backend}"\nverify = true\n'
                                       f'layerwise = {str(layerwise).lower()}\n')
    return LaunchedCluster(config, name, env=env)


@pytest.fixture(scope="module")
def reference():
    llm = reference_llm()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return [llm.tokenizer.decode(o.token_ids) for o in outs]


def texts(cluster, at_once: bool = True) -> list[str]:
    """The greedy answer to each prompt; `at_once`: the requests sent together (float32 answers
    do not depend on the batch), else one after another."""
    def text(p):
        return cluster.client.completions.create(model="smollm2-135m-instruct", prompt=p, max_tokens=MAX_TOKENS,
                                                 temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    if not at_once:
        return [text(p) for p in PROMPTS]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(text, PROMPTS))


def counter(metrics: str, name: str, **labels) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(f"pdcluster:{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_auto_picks_shm_on_one_cpu_host_and_matches_the_offline_engine(reference):
    cluster = launch("auto", "kv-auto")
    try:
        assert texts(cluster) == reference
        assert re.search(r"kv_transfer auto -> shm for decode peer tcp://127\.0\.0\.1:\d+", cluster.log("prefill-0"))
        metrics = cluster.metrics()
        assert counter(metrics, "kv_transfer_bytes_total", worker="decode-0") > 0
        assert counter(metrics, "kv_transfer_failures_total") == 0
    finally:
        assert cluster.stop() == []


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_zmq_corrupted_transfers_are_caught_prefilled_again_and_counted(reference, layerwise):
    cluster = launch("zmq", f"kv-zmq-faults-{layerwise}", env={FAULT_ENV: FAULTS}, layerwise=layerwise)
    try:
        assert texts(cluster, at_once=False) == reference
        failures = counter(cluster.metrics(), "kv_transfer_failures_total", worker="decode-0", reason="checksum")
        assert failures >= 2
        assert "prefilling it again" in cluster.log("prefill-0")
    finally:
        assert cluster.stop() == []


@pytest.mark.parametrize("backend", ["zmq", "shm"])
def test_layerwise_streaming_matches_the_offline_engine(reference, backend):
    cluster = launch(backend, f"kv-layerwise-{backend}", layerwise=True)
    try:
        assert texts(cluster) == reference
        assert counter(cluster.metrics(), "kv_transfer_failures_total") == 0   # verify covered every layer
        assert "layer-wise KV streaming on" in cluster.log("prefill-0")
        assert "layers ahead)" in cluster.log("decode-0")   # every layer left before its kv_batch
    finally:
        assert cluster.stop() == []
