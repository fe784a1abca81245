"""Prefix cache through the whole cluster and the official client: two prefill workers
behind the `cache_aware` router. A conversation's second request goes back to the prefill
worker holding its prefix (the router log says so), that worker extends from the cached
pages (its `Prefill batch` line and /metrics say so), and the greedy answer is the same
token for token as the cold one."""
import re

import pytest

from tests.cluster_harness import LaunchedCluster, cluster_config

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are a concise assistant for a small bakery. Answer every question in one short "
          "sentence, mention prices in euros, and never invent products that are not on the menu.")


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[prefill]]\ncount = 2\n\n[[decode]]\ncount = 1\n",
                                       extra='\n[router]\npolicy = "cache_aware"\n'), "prefixcache")
    yield c
    c.stop()


def chat(cluster, messages):
    r = cluster.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    return r.choices[0].message.content


def test_cache_hit_answer_equals_cold_answer_and_routes_to_the_holder(cluster):
    turn1 = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you sell rye bread?"}]
    cold = chat(cluster, turn1)
    warm = chat(cluster, turn1)                     # the same prompt: every whole page is cached
    assert warm == cold
    turn2 = turn1 + [{"role": "assistant", "content": cold}, {"role": "user", "content": "How much is it?"}]
    chat(cluster, turn2)
    router = cluster.log("router")
    choices = re.findall(r"cache_aware: prefill (\S+) -> (prefill-\d) \(([^;]+);", router)
    assert len(choices) == 3
    holder = choices[0][1]
    assert [c[1] for c in choices] == [holder] * 3
    assert [c[2] for c in choices[1:]] == ["longest cached prefix"] * 2
    # decode kept each finished request's KV: the router counts it once the request finished
    decode_choices = re.findall(r"cache_aware: decode \S+ -> decode-0 \(([^;]+);", router)
    assert decode_choices[1:] == ["longest cached prefix"] * 2
    cached = [int(n) for n in re.findall(r"Prefill batch \[\d+\].*#cached-token: (\d+)", cluster.log(holder))]
    assert cached[0] == 0 and cached[2] >= cached[1] > 0     # turn 2 re-uses all turn 1 prompt pages


def test_prefix_cache_hit_rate_is_exported(cluster):
    rates = dict(re.findall(r'pdcluster:prefix_cache_hit_rate\{role="prefill",worker="(prefill-\d)"\} (\S+)',
                            cluster.metrics()))
    assert set(rates) == {"prefill-0", "prefill-1"}
    assert max(float(v) for v in rates.values()) > 0.3
