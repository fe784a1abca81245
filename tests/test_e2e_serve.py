"""`pdcluster serve`: one prefill + one decode worker for the default model, no config file;
`--host 0.0.0.0` exposes HTTP but never the workers' planes. The cluster is shared with
test_e2e_native_weights.py; its release checks that it stops cleanly (tests/cluster_pool.py)."""
import psutil
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.shared_cluster("serve")]


def test_serve_without_a_config_answers_with_worker_planes_on_loopback(shared_cluster):
    c = shared_cluster
    r = c.client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                    max_tokens=4, temperature=0)
    assert "Paris" in r.choices[0].text
    assert c.iterations("prefill-0", "Prefill") and c.iterations("decode-0", "Decode")
    for wid, pid in c.worker_pids().items():             # data plane on loopback only
        listening = [s.laddr for s in psutil.Process(pid).net_connections("tcp")
                     if s.status == psutil.CONN_LISTEN]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), (wid, listening)
