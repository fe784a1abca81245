"""The OpenAI features users build on, end to end: a real 1 prefill + 1 decode + 1 dllm cluster,
the official client. n choices, JSON schemas (xgrammar), tool calls (whole and streamed), top
logprobs against the offline engine, logit_bias, echo, prompt lists, DLLM refusals."""
from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest

from cluster.sampling_params import SamplingParams
from tests.cluster_harness import reference_llm

pytestmark = [pytest.mark.integration, pytest.mark.shared_cluster("local")]
MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
SCHEMAS = [
    {"type": "object", "additionalProperties": False, "required": ["name", "age"],
     "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}}},
    {"type": "object", "additionalProperties": False, "required": ["city", "sky"],
     "properties": {"city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                             "properties": {"name": {"type": "string", "maxLength": 12},
                                            "country": {"enum": ["FR", "DE", "US"]}}},
                    "sky": {"enum": ["clear", "cloudy"]}}},
    {"type": "object", "additionalProperties": False, "required": ["colors"],
     "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 3,
                               "items": {"enum": ["red", "green", "blue"]}}}},
]


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


@pytest.fixture(scope="module")
def llm():
    return reference_llm()


def chat(cluster, content, **kw):
    return cluster.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                  **{"max_tokens": 40, "temperature": 0, **kw})


def test_n_choices_with_a_seed_are_reproducible_and_usage_counts_the_prompt_once(cluster):
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=6, temperature=1.0, n=3, seed=7)
    a = cluster.client.completions.create(**kw)
    b = cluster.client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    one = cluster.client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == texts[0]                   # choice 0 uses the seed itself
    assert a.usage.prompt_tokens == one.usage.prompt_tokens
    assert a.usage.completion_tokens == sum(len(t) > 0 and 6 for t in texts) or a.usage.completion_tokens >= 3


def kv_bytes(cluster) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in cluster.metrics().splitlines()
               if line.startswith("pdcluster:kv_transfer_bytes_total{") and 'worker="decode-0"' in line)


def reported_kv_bytes(cluster) -> float:
    """The decode worker's KV bytes once its heartbeats reported every transfer so far (a request
    that ended had its KV imported before its first token)."""
    cluster.wait_heartbeats("decode-0")
    return kv_bytes(cluster)


def new_prefills(log: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2)))
            for m in re.finditer(r"Prefill batch \[\d+\], #new-seq: (\d+), #new-token: (\d+)", log)]


def test_n_choices_are_prefilled_and_transferred_once(cluster):
    base = reported_kv_bytes(cluster)
    one = cluster.client.completions.create(model=MODEL, prompt="The river that runs through Paris",
                                            max_tokens=2, temperature=0)
    per_token = (reported_kv_bytes(cluster) - base) / one.usage.prompt_tokens
    before_log, before = len(cluster.log("prefill-0")), kv_bytes(cluster)
    many = cluster.client.completions.create(model=MODEL, prompt="Three colours of the autumn leaves are",
                                             max_tokens=4, temperature=1.0, n=3, seed=11)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("length", "stop") for c in many.choices)
    shipped = reported_kv_bytes(cluster) - before
    assert shipped == pytest.approx(per_token * many.usage.prompt_tokens, rel=0.05)   # one prompt, not 3
    time.sleep(0.5)
    prefills = new_prefills(cluster.log("prefill-0")[before_log:])
    assert sum(seqs for seqs, _ in prefills) == 1, prefills
    assert sum(tokens for _, tokens in prefills) <= many.usage.prompt_tokens
    assert many.usage.completion_tokens <= 3 * 4


@pytest.mark.parametrize("schema", SCHEMAS, ids=["flat", "nested_enum", "array"])
def test_json_schema_output_parses_and_validates(cluster, schema):
    r = chat(cluster, "Describe a person, a city or colors as JSON.",
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_and_regex_extension(cluster):
    r = chat(cluster, "What is the capital of France? Answer in JSON.", response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = cluster.client.completions.create(model=MODEL, prompt="An email:", max_tokens=20, temperature=0,
                                          extra_body={"regex": r"[a-z]{2,8}@example\.com"})
    assert r.choices[0].text.endswith("@example.com")


def test_tool_choice_required_returns_a_valid_call_and_the_stream_reassembles_it(cluster):
    kw = dict(tools=[WEATHER], tool_choice="required", max_tokens=48)
    r = chat(cluster, "What is the weather in Paris?", **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) >= 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    names, args, finish = {}, {}, None
    for chunk in chat(cluster, "What is the weather in Paris?", stream=True, **kw):
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                names[tc.index] = names.get(tc.index, "") + (tc.function.name or "")
                args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
    assert finish == "tool_calls"
    assert names[0] == call.function.name and json.loads(args[0]) == json.loads(call.function.arguments)


def test_named_tool_choice_returns_its_arguments(cluster):
    r = chat(cluster, "Weather in Berlin?", tools=[WEATHER],
             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_top_logprobs_agree_with_the_engine_and_are_sorted(cluster, llm):
    prompt = "The capital of France is"
    r = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=5)
    ref = llm.generate([prompt], SamplingParams(max_tokens=4, logprobs=True, top_logprobs=5))[0]
    lp = r.choices[0].logprobs
    assert len(lp.top_logprobs) == len(ref.top_logprobs) == 4
    for got, want in zip(lp.top_logprobs, ref.top_logprobs):
        values = list(got.values())
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert [llm.tokenizer.decode([t], skip_special_tokens=False) for t, _ in want] == list(got)
        assert all(abs(a - b) < 1e-3 for a, (_, b) in zip(values, want))
    c = chat(cluster, "Hi!", max_tokens=3, logprobs=True, top_logprobs=3)
    for item in c.choices[0].logprobs.content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and item.top_logprobs[0].token == item.token


def test_logit_bias_minus_100_bans_a_token(cluster, llm):
    prompt = "1, 2, 3, 4,"
    base = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    first = llm.tokenizer.encode(prompt + base.choices[0].text)[len(llm.tokenizer.encode(prompt))]
    banned = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                               logit_bias={str(first): -100})
    assert banned.choices[0].text != base.choices[0].text
    ids = llm.tokenizer.encode(prompt + banned.choices[0].text)[len(llm.tokenizer.encode(prompt)):]
    assert first not in ids[:1]


def test_echo_and_a_list_of_prompts(cluster, llm):
    r = cluster.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0,
                                          echo=True)
    assert r.choices[0].text.startswith("Once upon a time") and len(r.choices[0].text) > len("Once upon a time")
    prompts = ["The capital of France is", "Water boils at"]
    many = cluster.client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    ref = llm.generate(prompts, SamplingParams(max_tokens=6))
    got = {c.index: c.text for c in many.choices}
    assert got == {0: ref[0].text, 1: ref[1].text}            # greedy reference equality still holds
    ids = cluster.client.completions.create(model=MODEL, prompt=[llm.tokenizer.encode(p) for p in prompts],
                                            max_tokens=6, temperature=0)
    assert {c.index: c.text for c in ids.choices} == got


def test_dllm_refuses_what_it_cannot_do_naming_the_parameter(cluster):
    for kw, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"logit_bias": {"5": 1}}, "logit_bias")]:
        with pytest.raises(openai.BadRequestError) as e:
            cluster.client.chat.completions.create(model=MODEL + "-dllm", max_tokens=4,
                                                   messages=[{"role": "user", "content": "Hi"}], **kw)
        assert param in str(e.value)


def test_tokenize_and_detokenize(cluster, llm):
    got = httpx.post(cluster.base_url + "/tokenize", json={"model": MODEL, "prompt": "Hello there"}).json()
    assert got["tokens"] == llm.tokenizer.encode("Hello there")
    back = httpx.post(cluster.base_url + "/detokenize", json={"model": MODEL, "tokens": got["tokens"]}).json()
    assert back["prompt"] == "Hello there"
    assert cluster.client.models.retrieve(MODEL).id == MODEL


def test_echo_with_logprobs_returns_the_prompt_logprobs_of_the_engine(cluster, llm):
    prompt = "The capital of France is"
    ids = llm.tokenizer.encode(prompt)
    r = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                          logprobs=1)
    ref = llm.generate([prompt], SamplingParams(max_tokens=3, logprobs=True, prompt_logprobs=True))[0]
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert lp.tokens[:len(ids)] == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 3
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp.token_logprobs[1:len(ids)], ref.prompt_logprobs))
    assert all(abs(a - b) < 1e-3 for a, b in zip(lp.token_logprobs[len(ids):], ref.logprobs))
    assert lp.text_offset[len(ids)] == len(prompt)
