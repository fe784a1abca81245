"""The colocated baseline: one unified worker behind the router; same greedy tokens as
the offline engine (and so as the disaggregated cluster); Ctrl-C stops everything."""
import signal

import pytest

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.cluster_harness import REFERENCE_WEIGHTS, LaunchedCluster, cluster_config
from tests.router_harness import stream_endings
from tests.test_e2e_local import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[unified]]\ncount = 1\n"), "unified")
    yield c
    c.stop()


def test_unified_greedy_equals_offline_engine(cluster):
    llm = LLM(cpu_weights=REFERENCE_WEIGHTS)
    ref = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS))
    for prompt, out in zip(PROMPTS, ref):
        r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == out.text, prompt


def test_unified_log_lines_name_their_launch_iteration(cluster):
    prefill = cluster.iterations("unified-0", "Prefill")
    decode = cluster.iterations("unified-0", "Decode")
    both = sorted(prefill + decode)
    assert prefill and decode
    assert both == sorted(set(both))      # one worker: every iteration reported once


def test_unified_json_schema_and_top_logprobs(cluster):
    import json

    import jsonschema
    schema = {"type": "object", "additionalProperties": False, "required": ["city"],
              "properties": {"city": {"type": "string", "maxLength": 12}}}
    r = cluster.client.chat.completions.create(
        model="smollm2-135m-instruct", max_tokens=24, temperature=0, logprobs=True, top_logprobs=2,
        messages=[{"role": "user", "content": "Where is the Eiffel tower? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    for item in r.choices[0].logprobs.content:   # the grammar's pick is the top of the processed distribution
        assert item.top_logprobs[0].token == item.token and len(item.top_logprobs) == 2


def test_burst_of_128_streams_each_ends_with_done_or_an_error_event(cluster):
    """A burst larger than the running batch: no stream may end with a cut connection."""
    ends = stream_endings(cluster.base_url, {"model": "smollm2-135m-instruct", "prompt": "Tell me a story.",
                                             "max_tokens": 8, "temperature": 0}, 128, timeout=600)
    assert all(e in ("done", "error") for e in ends), {e: ends.count(e) for e in set(ends)}
    assert ends.count("done") == 128                   # nothing here should fail either


def test_ctrl_c_leaves_no_child_process(cluster):
    assert len(cluster.descendants) >= 2
    assert cluster.stop(signal.SIGINT) == []
