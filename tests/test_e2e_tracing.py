"""Request tracing end to end: a real 1 prefill + 1 decode cluster with an API key and OTLP
export to an in-process OTLP/HTTP receiver; a request's phases add up to its latency, are
ordered, and name the forward iterations of the worker log lines about that request."""
import json
import os
import re
import subprocess
import time

import httpx
import pytest

from cluster.router.request_trace import PHASES
from tests.cluster_harness import LaunchedCluster, cluster_config, pdcluster_cmd
from tests.otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration

API_KEY = "sk-tracing-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 6
ITER = re.compile(r"\[(\d+)\]")


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def cluster(receiver):
    toml = cluster_config("[[prefill]]\ncount = 1\n[[decode]]\ncount = 1\n",
                          extra=f'heartbeat_dead_after = 60\n[router]\napi_key = "{API_KEY}"\n'
                                f'[tracing]\notlp_endpoint = "{receiver.endpoint}"\n')
    c = LaunchedCluster(toml, "tracing")
    yield c
    c.stop()


def complete(cluster, prompt: str, stream: bool = False) -> tuple[str, float, dict]:
    """(request id from x-request-id, client-side seconds, body or last event)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    # NOTE: the client is built before the clock starts: building one (its TLS context) is CPU work
    # of this process, tens of ms alone and more on loaded cores, and no part of the request
    with httpx.Client(timeout=300) as http:
        t0 = time.perf_counter()
        with http.stream("POST", cluster.base_url + "/v1/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200, r.read()
            text = r.read().decode()
        elapsed = time.perf_counter() - t0
    return r.headers["x-request-id"], elapsed, (json.loads(text) if not stream else {})


def debug(cluster, rid: str) -> dict:
    r = httpx.get(f"{cluster.base_url}/debug/requests/{rid}", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def lines_about(log: str, rid: str) -> list[str]:
    return [line for line in log.splitlines() if rid in line]


def test_phases_add_up_to_the_latency_in_order_and_name_logged_iterations(cluster):
    rid, client_s, body = complete(cluster, "The capital of France is")
    assert body["id"].endswith(rid) and body["usage"]["completion_tokens"] == MAX_TOKENS
    trace = debug(cluster, rid)
    phases = trace["phases"]
    assert [p["phase"] for p in phases] == list(PHASES)
    assert trace["status"] == "success" and trace["num_tokens"] == MAX_TOKENS
    assert phases[0]["start_s"] == 0.0
    for a, b in zip(phases, phases[1:]):                   # ordered and contiguous
        assert a["end_s"] == pytest.approx(b["start_s"], abs=1e-6) and a["duration_s"] >= 0
    total = sum(p["duration_s"] for p in phases)
    assert total == pytest.approx(trace["e2e_s"], abs=1e-3)
    # the router's view is inside the client's: only HTTP and parsing are outside it
    assert trace["e2e_s"] <= client_s + 1e-3 and total >= 0.8 * client_s - 0.05, (total, client_s)
    by = {p["phase"]: p for p in phases}
    assert by["prefill_forward"]["worker"] == "prefill-0"
    assert by["kv_transfer"]["worker"] == "decode-0" and by["kv_transfer"]["bytes"] > 0
    assert by["kv_transfer"]["backend"] and by["kv_transfer"]["src"] == "prefill-0"
    assert by["first_decode"]["worker"] == "decode-0"

    # the iterations named by the phases are those of the worker lines about this request
    prefill_iter, decode_iter = by["prefill_forward"]["forward_iter"], by["first_decode"]["forward_iter"]
    prefill_lines = lines_about(cluster.log("prefill-0"), rid)
    decode_lines = lines_about(cluster.log("decode-0"), rid)
    assert prefill_lines and decode_lines
    assert prefill_iter in {int(n) for line in prefill_lines for n in ITER.findall(line)}
    assert decode_iter in {int(n) for line in decode_lines for n in ITER.findall(line)}
    assert prefill_iter == by["kv_transfer"]["src_forward_iter"]
    assert prefill_iter in cluster.iterations("prefill-0", "Prefill")
    assert decode_iter in cluster.iterations("decode-0", "Decode")
    assert by["decode"]["forward_iter"] >= decode_iter    # the last decode step's batch
    # each token names the batch that sampled it: prefill's for the first, then decode's
    token_iters = [t["forward_iter"] for t in trace["tokens"]]
    assert sum(t["num_tokens"] for t in trace["tokens"]) == MAX_TOKENS
    assert token_iters[:2] == [prefill_iter, decode_iter]
    assert token_iters[1:] == sorted(token_iters[1:]) and token_iters[-1] == by["decode"]["forward_iter"]


def test_debug_requests_requires_the_api_key(cluster):
    rid, _, _ = complete(cluster, "Once upon a time")
    url = f"{cluster.base_url}/debug/requests/{rid}"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(url, headers=AUTH, timeout=10).json()["id"] == rid
    assert httpx.get(f"{cluster.base_url}/debug/requests/cmpl-{rid}", headers=AUTH,
                     timeout=10).status_code == 200
    missing = httpx.get(f"{cluster.base_url}/debug/requests/nope", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_streaming_response_carries_the_request_id(cluster):
    rid, _, _ = complete(cluster, "1, 2, 3, 4,", stream=True)
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert debug(cluster, rid)["status"] == "success"


def test_spans_arrive_over_otlp_with_worker_and_forward_iter_attributes(cluster, receiver):
    rid, _, _ = complete(cluster, "Water boils at")
    phases = {p["phase"]: p for p in debug(cluster, rid)["phases"]}
    spans = receiver.wait_for(rid, {"request", *PHASES})
    by = {s["name"]: s for s in spans}
    assert set(by) == {"request", *PHASES}
    root = by["request"]
    assert root["attributes"]["pdcluster.request_id"] == rid
    assert root["attributes"]["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert all(by[p]["parent_span_id"] == root["span_id"] for p in PHASES)
    attrs = by["prefill_forward"]["attributes"]
    assert attrs["pdcluster.worker"] == "prefill-0"
    assert attrs["pdcluster.forward_iter"] == phases["prefill_forward"]["forward_iter"]
    assert by["first_decode"]["attributes"]["pdcluster.forward_iter"] == \
        phases["first_decode"]["forward_iter"]
    assert by["kv_transfer"]["attributes"]["pdcluster.bytes"] == phases["kv_transfer"]["bytes"]
    assert root["start"] <= by["router_queue"]["start"] and by["decode"]["end"] <= root["end"] + 1e-6


def test_bench_writes_vllm_named_json_and_plots(cluster, tmp_path):
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    proc = subprocess.run(pdcluster_cmd() + [
        "bench", "--url", cluster.base_url + "/v1", "--api-key", API_KEY, "--num-requests", "4",
        "--concurrency", "2", "--prompt-len", "8", "--max-tokens", "4", "--slo-ttft", "60",
        "--json", str(out), "--plot", str(plots)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0
    assert result["request_goodput"] > 0 and result["mean_ttft_ms"] > 0
    assert result["total_output_tokens"] == 16 and len(result["itls"]) == 4
    assert "Serving Benchmark Result" in proc.stdout
    for name in ("latency_cdf.png", "throughput.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG"


def dashboard_metrics() -> set[str]:
    """Every pdcluster metric the Grafana dashboard queries (histogram series folded)."""
    path = os.path.join(os.path.dirname(__file__), "..", "deploy", "grafana", "pdcluster.json")
    with open(path) as f:
        dashboard = json.load(f)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {m for e in exprs for m in re.findall(r"pdcluster:[a-zA-Z0-9_]+", e)}
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_every_metric_the_dashboard_queries_exists_on_metrics(cluster):
    complete(cluster, "Roses are red,")
    text = cluster.metrics()
    queried = dashboard_metrics()
    assert len(queried) >= 20
    missing = sorted(n for n in queried if f"# TYPE {n} " not in text)
    assert not missing, f"on the dashboard, not on /metrics: {missing}"
    # the phase histogram is filled by the requests above
    assert re.search(r'pdcluster:request_phase_seconds_count\{phase="kv_transfer"\} [1-9]', text)
