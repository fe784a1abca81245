"""The cluster with native (packed GGUF) CPU weights serves the default model end to end: one
prefill and one decode worker answer greedy requests as the offline engine with the same weights
(short prompts, few tokens: every forward here takes the packed kernels on both sides). Native
weights are the default: the cluster is `pdcluster serve`'s, shared with test_e2e_serve.py."""
import pytest

from cluster.engine import quant_linear
from tests.cluster_harness import offline_greedy

pytestmark = [pytest.mark.integration, pytest.mark.shared_cluster("serve"),
              pytest.mark.skipif(not quant_linear.native_kernels_available(),
                                 reason="torch's packed kernels are not vectorized on this CPU")]
PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster(shared_cluster):
    return shared_cluster


def test_native_weights_cluster_answers_like_the_offline_engine(cluster):
    expected, tokenizer = offline_greedy(PROMPTS, MAX_TOKENS, cpu_weights="native")
    for prompt in PROMPTS:
        r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == tokenizer.decode(expected[prompt]), prompt
    for worker in ("prefill-0", "decode-0"):
        assert "cpu_weights native: 121 packed weights" in cluster.log(worker)
