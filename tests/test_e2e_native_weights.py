"""The cluster with native (packed GGUF) CPU weights serves the default model end to end: one
prefill and one decode worker answer greedy requests as the offline engine with the same weights
(short prompts, few tokens: every forward here takes the packed kernels on both sides)."""
import pytest

from cluster.engine import quant_linear
from tests.cluster_harness import LaunchedCluster, cluster_config, offline_greedy

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not quant_linear.native_kernels_available(),
                                 reason="torch's packed kernels are not vectorized on this CPU")]
PROMPTS = ["The capital of France is", "def add(a, b):"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster():
    c = LaunchedCluster(cluster_config("[[prefill]]\ncount = 1\n[[decode]]\ncount = 1\n", cpu_weights="native"),
                        "native-weights")
    yield c
    c.stop()


def test_native_weights_cluster_answers_like_the_offline_engine(cluster):
    expected, tokenizer = offline_greedy(PROMPTS, MAX_TOKENS, cpu_weights="native")
    for prompt in PROMPTS:
        r = cluster.client.completions.create(model="smollm2-135m-instruct", prompt=prompt,
                                              max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == tokenizer.decode(expected[prompt]), prompt
    for worker in ("prefill-0", "decode-0"):
        assert "cpu_weights native: 121 packed weights" in cluster.log(worker)
