"""The colocated baseline: one unified worker behind a router of two HTTP front-end processes
over one dispatcher (`[router] api_servers = 2`); same greedy tokens as the offline engine (and
so as the disaggregated cluster), whole or streamed by either front end; /metrics counts each
request once; a client that goes away frees the worker's pages; a front end that dies is
restarted while the other's streams go on; Ctrl-C stops everything."""
import concurrent.futures as cf
import json
import os
import re
import signal
import time

import httpx
import psutil
import pytest

from tests.cluster_harness import LaunchedCluster, cluster_config, offline_greedy
from tests.router_harness import stream_endings
from tests.test_e2e_local import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
FRONTEND = "x-pdcluster-frontend"


@pytest.fixture(scope="module")
def reference() -> list[str]:
    ids, tokenizer = offline_greedy(PROMPTS, MAX_TOKENS)
    return [tokenizer.decode(ids[p]) for p in PROMPTS]


@pytest.fixture(scope="module")
def cluster(reference):                    # NOTE: after the reference: computed before the launch
    c = LaunchedCluster(cluster_config("[[unified]]\ncount = 1\n", extra="[router]\napi_servers = 2\n"), "unified")
    yield c
    c.stop()


def test_unified_greedy_equals_offline_engine(cluster, reference):
    def text(prompt):
        return cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0).choices[0].text
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:     # float32 answers do not depend on the batch
        texts = list(pool.map(text, PROMPTS))
    for prompt, got, want in zip(PROMPTS, texts, reference):
        assert got == want, prompt


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


def stream(base_url: str, prompt: str, max_tokens: int, started=None, **extra) -> tuple[str, str, str]:
    """(front end that answered, streamed text, how the stream ended), on a fresh connection;
    `started` gets the front end as soon as the response began."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra}
    text, ended = "", "cut"
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        if started is not None:
            started.append(resp.headers.get(FRONTEND, ""))
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                ended = "done"
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"] if '"choices":[{' in line else ""
        return resp.headers.get(FRONTEND, ""), text, ended


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{[^}}]*{re.escape(want)}[^}}]*}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def frontend_pids(cluster) -> dict[str, int]:
    out = {}
    for p in psutil.Process(cluster.proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if "--frontend-id" in cmd and p.status() != psutil.STATUS_ZOMBIE:
                out[cmd[cmd.index("--frontend-id") + 1]] = p.pid
        except psutil.NoSuchProcess:
            pass
    return out


def test_both_front_ends_stream_the_engines_greedy_text(cluster, reference):
    seen = set()
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        for _ in range(4):                 # connections go to whichever front end accepts first
            results = list(pool.map(lambda p: stream(cluster.base_url, p, MAX_TOKENS), PROMPTS))
            assert [text for _, text, _ in results] == reference
            assert all(ended == "done" for _, _, ended in results)
            seen |= {fe for fe, _, _ in results}
            if len(seen) == 2:
                break
    assert seen == {"frontend-0", "frontend-1"}


def settled_successes(cluster) -> float:
    """requests_total{success} once every front end has reported twice since the call: a report
    carries its cumulative counts and its CPU seconds, which move with each one, and a request is
    counted before its client gets the last chunk. (Two reads 0.7 s apart agreeing was a guess
    that a report late on loaded cores could beat, reading a count one request short.)"""
    page = cluster.metrics()
    frontends = re.findall(r'^pdcluster:router_cpu_seconds_total\{process="(frontend-\d+)"\}', page, re.M)
    assert frontends, page
    reports = {fe: [metric(page, "pdcluster:router_cpu_seconds_total", process=fe)] for fe in frontends}
    deadline = time.monotonic() + 60
    while any(len(cpu) < 3 for cpu in reports.values()):
        assert time.monotonic() < deadline, f"front ends did not report twice in 60 s: {reports}"
        time.sleep(0.1)
        page = cluster.metrics()
        for fe, cpu in reports.items():
            if (now := metric(page, "pdcluster:router_cpu_seconds_total", process=fe)) != cpu[-1]:
                cpu.append(now)
    return metric(page, "pdcluster:requests_total", outcome="success")


def test_metrics_count_each_request_once_and_each_front_ends_cpu(cluster):
    before = settled_successes(cluster)
    with cf.ThreadPoolExecutor(6) as pool:
        fronts = [fe for fe, _, _ in pool.map(lambda i: stream(cluster.base_url, "Hello", 2), range(6))]
    assert settled_successes(cluster) == before + 6, fronts
    page = cluster.metrics()
    assert page.count("# TYPE pdcluster:requests_total counter") == 1
    for process in ("router", "frontend-0", "frontend-1"):
        assert metric(page, "pdcluster:router_cpu_seconds_total", process=process) > 0


def test_a_client_that_goes_away_frees_the_workers_pages(cluster):
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster.base_url + "/v1/completions", json=body, timeout=60) as resp:
        for i, _ in enumerate(resp.iter_lines()):
            if i >= 6:
                break                      # the connection closes here, mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        page = cluster.metrics()
        if (metric(page, "pdcluster:num_running_reqs", worker="unified-0") == 0
                and metric(page, "pdcluster:requests_total", outcome="aborted") >= 1):
            break
        time.sleep(0.3)
    assert metric(page, "pdcluster:num_running_reqs", worker="unified-0") == 0
    assert metric(page, "pdcluster:token_usage", worker="unified-0") == 0
    assert metric(page, "pdcluster:requests_total", outcome="aborted") >= 1


def test_a_killed_front_end_is_restarted_and_the_others_streams_finish(cluster):
    pids, started = frontend_pids(cluster), []
    with cf.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, cluster.base_url, "Tell me a story.", 48, started, ignore_eos=True)
                   for _ in range(8)]
        deadline = time.monotonic() + 60
        while len(started) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        keeper = max(set(started), key=started.count)        # the front end serving most streams
        victim = "frontend-1" if keeper == "frontend-0" else "frontend-0"
        os.kill(pids[victim], signal.SIGKILL)
        results = [f.result() if f.exception() is None else (victim, "", "cut") for f in streams]
    kept = [ended for fe, _, ended in results if fe == keeper]
    assert len(kept) == started.count(keeper) and all(e == "done" for e in kept), results
    deadline = time.monotonic() + 60                # its own bound: the streams may have used the first one
    while time.monotonic() < deadline:
        if frontend_pids(cluster).get(victim) not in (None, pids[victim]):
            break
        time.sleep(0.2)
    assert frontend_pids(cluster).get(victim) not in (None, pids[victim])


def test_ctrl_c_leaves_no_child_process(cluster):
    assert len(cluster.descendants) >= 2
    assert cluster.stop(signal.SIGINT) == []
