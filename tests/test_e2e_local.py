"""The product end to end: `pdcluster launch configs/local.toml` (what `make run` starts:
1 prefill + 1 decode + 1 DLLM worker), the official openai client, the real default model,
greedy output equal to LLM.generate. The cluster is shared with test_e2e_openai_features.py;
its release checks that SIGTERM leaves no child process (tests/cluster_pool.py)."""
import concurrent.futures as cf

import httpx
import openai
import pytest

from tests.cluster_harness import offline_greedy

pytestmark = [pytest.mark.integration, pytest.mark.shared_cluster("local")]

PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def add(a, b):",
           "The best thing about Python is", "Water boils at", "My favourite colour is", "Roses are red,"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


@pytest.fixture(scope="module")
def reference():
    return offline_greedy(PROMPTS, MAX_TOKENS)


def completion_ids(cluster, tokenizer, prompt):
    r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                          max_tokens=MAX_TOKENS, temperature=0)
    return r


def test_chat_answers_the_capital_of_france(cluster):
    r = cluster.client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 5
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_greedy_equals_offline_engine(cluster, reference):
    ref, tok = reference
    r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=PROMPTS[0],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == tok.decode(ref[PROMPTS[0]])
    assert r.usage.completion_tokens == len(ref[PROMPTS[0]])
    assert r.choices[0].finish_reason == "length"


def test_streaming_chat_and_completion(cluster, reference):
    ref, tok = reference
    chunks = list(cluster.client.completions.create(
        model="smollm2-135m-instruct", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tok.decode(ref[PROMPTS[1]])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS
    pieces = [c.choices[0].delta.content or "" for c in cluster.client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_32_concurrent_requests_complete_with_reference_outputs(cluster, reference):
    ref, tok = reference
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]

    def one(p):
        r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=p,
                                              max_tokens=MAX_TOKENS, temperature=0)
        return p, r.choices[0].text

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, prompts))
    assert len(results) == 32
    for p, text in results:
        assert text == tok.decode(ref[p]), p


def test_stop_string_is_trimmed_and_finishes(cluster, reference):
    ref, tok = reference
    full = tok.decode(ref[PROMPTS[2]])          # " 5, 6, 7, ..."
    r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=PROMPTS[2],
                                          max_tokens=MAX_TOKENS, temperature=0, stop=["7"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index("7")]


def test_bad_requests_get_openai_errors_and_the_server_stays_up(cluster):
    with pytest.raises(openai.BadRequestError):
        cluster.client.completions.create(model="smollm2-135m-instruct", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        cluster.client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    r = httpx.post(cluster.base_url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}
    assert cluster.client.completions.create(model="smollm2-135m-instruct", prompt="hi",
                                             max_tokens=2).choices[0].text is not None


def test_models_health_and_metrics(cluster):
    assert "smollm2-135m-instruct" in [m.id for m in cluster.client.models.list().data]
    assert httpx.get(cluster.base_url + "/health", timeout=10).status_code == 200
    text = cluster.metrics()
    for name in ("pdcluster:forward_iter", "pdcluster:kv_transfer_bytes_total", "pdcluster:num_running_reqs",
                 "pdcluster:time_to_first_token_seconds", "pdcluster:requests_total"):
        assert name in text, name
    assert 'worker="decode-0"' in text and 'worker="prefill-0"' in text


def test_worker_log_iterations_are_strictly_increasing_and_unique(cluster):
    prefill = cluster.iterations("prefill-0", "Prefill")
    decode = cluster.iterations("decode-0", "Decode")
    assert len(prefill) >= 5 and len(decode) >= 10
    for iters in (prefill, decode):
        assert iters == sorted(set(iters))
    assert cluster.iterations("decode-0", "Prefill") == []    # decode never prefills a handed-off prompt


def test_dllm_model_is_listed_and_block_size_1_equals_the_disaggregated_path(cluster, reference):
    ref, tok = reference
    assert "smollm2-135m-instruct-dllm" in [m.id for m in cluster.client.models.list().data]
    for prompt in PROMPTS[:3]:
        r = cluster.client.completions.create(model="smollm2-135m-instruct-dllm", prompt=prompt,
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == tok.decode(ref[prompt]), prompt
    dllm_iters = cluster.iterations("dllm-0", "Prefill")
    assert dllm_iters and dllm_iters == sorted(set(dllm_iters))


def test_dllm_streams_by_blocks(cluster):
    chunks = [c.choices[0].text for c in cluster.client.completions.create(
        model="smollm2-135m-instruct-dllm", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
        extra_body={"block_size": 4, "algorithm": "fixed_steps", "steps_per_block": 2}) if c.choices]
    assert len(chunks) >= 2 and "".join(chunks)
    with pytest.raises(openai.BadRequestError):
        cluster.client.completions.create(model="smollm2-135m-instruct-dllm", prompt="hi", max_tokens=4,
                                          extra_body={"algorithm": "no-such-algorithm"})


def test_router_and_every_worker_run_as_child_processes(cluster):
    assert len(cluster.descendants) >= 4          # router + prefill + decode + dllm
