"""`pdcluster serve`: one prefill + one decode worker for the default model, no config file."""
import pytest

from tests.cluster_harness import LaunchedCluster

pytestmark = pytest.mark.integration


def test_serve_without_a_config_answers_and_stops_cleanly():
    c = LaunchedCluster("", "serve", serve=True)
    try:
        r = c.client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                        max_tokens=4, temperature=0)
        assert "Paris" in r.choices[0].text
        assert c.iterations("prefill-0", "Prefill") and c.iterations("decode-0", "Decode")
    finally:
        assert c.stop() == []
