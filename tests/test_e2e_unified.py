"""The colocated baseline: one unified worker behind the router; same greedy tokens as
the offline engine (and so as the disaggregated cluster); Ctrl-C stops everything."""
import signal

import pytest

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster, cluster_config
from tests.test_e2e_local import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[unified]]\ncount = 1\n"), "unified")
    yield c
    c.stop()


def test_unified_greedy_equals_offline_engine(cluster):
    llm = LLM()
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


def test_ctrl_c_leaves_no_child_process(cluster):
    assert len(cluster.descendants) >= 2
    assert cluster.stop(signal.SIGINT) == []
