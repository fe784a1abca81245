"""Tiny Qwen3-MoE and DeepSeek-V2 (MoE + MLA) checkpoints, made here with transformers, served
by a real prefill/decode pair: greedy text equals the offline engine's (the unified worker's
engine). For MLA the handoff moves the latent: the KV bytes per prompt token that decode
received are (kv_lora_rank + qk_rope_head_dim) x layers x 4 (float32), not per-head K/V; the
latent pages also go through layer-wise shm, the prefix cache (a prompt sent again) and n > 1
forks. A decode pool of a few small latent pages retracts requests under page pressure and
resumes them through a `reprefill` (the prefill worker's expanded form recomputes the latents
that decode's absorbed form had built) with the same greedy text."""
from __future__ import annotations

import concurrent.futures as cf
import functools
import time

import pytest

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster
from tests.moe_checkpoints import DEFAULT_VOCAB, save_tiny, tiny_config

pytestmark = pytest.mark.integration

# none of whose greedy answers ends inside a UTF-8 character: the router holds such a tail back
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "Water boils at"]
MAX_TOKENS = 8
MODEL = "tiny-moe"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    paths = {}
    for family in ("qwen3_moe", "deepseek_v2"):
        paths[family] = str(tmp_path_factory.mktemp(family))
        save_tiny(paths[family], family, vocab_size=DEFAULT_VOCAB)
    return paths


@functools.lru_cache(maxsize=None)      # both MLA tests compare with the same checkpoint
def reference(path: str) -> list[str]:
    llm = LLM(MODEL, path=path, num_pages=256)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    texts = [llm.tokenizer.decode(o.token_ids) for o in outs]
    assert not any(t.endswith("\ufffd") for t in texts), texts
    return texts


def launch(path: str, name: str, kv: str, cache: bool = True, page_size: int = 16,
           decode: str = "") -> LaunchedCluster:
    return LaunchedCluster(f"""
[model]
name = "{MODEL}"
path = "{path}"

[scheduler]
num_pages = 256
page_size = {page_size}
max_running_requests = 16

[timeouts]
register = 240

[kv_transfer]
{kv}

[cache]
prefix_cache = {str(cache).lower()}

[[prefill]]
[[decode]]
{decode}
""", name)


def complete(cluster, prompt: str, n: int = 1):
    return cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             n=n, extra_body={"ignore_eos": True})


def decode_metric(cluster, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in cluster.metrics().splitlines()
               if line.startswith(f"pdcluster:{name}{{") and 'worker="decode-0"' in line)


def decode_bytes(cluster, want: float, timeout: float = 60.0) -> float:
    """decode-0's kv_transfer_bytes_total once its heartbeat reports `want` (or the timeout passes)."""
    deadline, got = time.monotonic() + timeout, -1.0
    while time.monotonic() < deadline:
        got = decode_metric(cluster, "kv_transfer_bytes_total")
        if got == want:
            break
        time.sleep(0.3)
    return got


def test_qwen3_moe_prefill_decode_pair_matches_the_offline_engine(checkpoints):
    want = reference(checkpoints["qwen3_moe"])
    cluster = launch(checkpoints["qwen3_moe"], "moe-qwen3", 'backend = "zmq"\nverify = true')
    try:
        assert [complete(cluster, p).choices[0].text for p in PROMPTS] == want
    finally:
        assert cluster.stop() == []


@pytest.fixture(scope="module")
def mla_zmq(checkpoints):
    """Pages of 4 tokens, decode holding 8: a prompt and its 8 new tokens fit alone (4 pages), but
    two or three running at once outgrow the pool and the newest are retracted."""
    cluster = launch(checkpoints["deepseek_v2"], "mla-zmq", 'backend = "zmq"\nverify = true', cache=False,
                     page_size=4, decode="num_pages = 8")
    yield cluster
    assert cluster.stop() == []


def test_mla_handoff_moves_the_latent_and_matches_the_offline_engine(checkpoints, mla_zmq):
    cfg = tiny_config("deepseek_v2")
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4
    want = reference(checkpoints["deepseek_v2"])
    before = decode_metric(mla_zmq, "kv_transfer_bytes_total")
    outs = [complete(mla_zmq, p) for p in PROMPTS]
    assert [o.choices[0].text for o in outs] == want
    moved = sum(o.usage.prompt_tokens for o in outs) * per_token
    assert decode_bytes(mla_zmq, before + moved) == before + moved
    forked = complete(mla_zmq, PROMPTS[0], n=2)   # one prefill, the latent pages forked on decode
    assert [c.text for c in forked.choices] == [want[0]] * 2


def test_mla_decode_retracts_latent_pages_under_pressure_and_resumes_with_the_same_text(checkpoints, mla_zmq):
    want = reference(checkpoints["deepseek_v2"])
    before = mla_zmq.log("decode-0").count("retracting")
    with cf.ThreadPoolExecutor(3 * len(PROMPTS)) as pool:
        outs = list(pool.map(lambda p: complete(mla_zmq, p), PROMPTS * 3))
    assert [o.choices[0].text for o in outs] == want * 3
    assert mla_zmq.log("decode-0").count("retracting") > before


def test_mla_latent_pages_through_layerwise_shm_prefix_cache_and_forks(checkpoints):
    want = reference(checkpoints["deepseek_v2"])
    cluster = launch(checkpoints["deepseek_v2"], "mla-shm", 'backend = "shm"\nverify = true\nlayerwise = true')
    try:
        for _ in range(2):   # the second round finds the prompts cached
            assert [complete(cluster, p).choices[0].text for p in PROMPTS] == want
        assert [c.text for c in complete(cluster, PROMPTS[1], n=3).choices] == [want[1]] * 3
        assert "layer-wise KV streaming on" in cluster.log("prefill-0")
    finally:
        assert cluster.stop() == []
