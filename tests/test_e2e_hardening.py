"""Hardening against a real cluster (1 router, 2 prefill, 2 decode, CURVE on, KV faults):
hostile HTTP input and a schemathesis fuzz never get a 5xx nor restart a process; under
100+ streamed requests a prefill SIGKILL, a decode SIGKILL, a decode SIGSTOP/SIGCONT and
dropped/corrupted KV transfers end every request with the uninterrupted greedy text or an
error naming the cause - none hangs, none is duplicated - and every survivor's
token_usage returns to 0; an unauthenticated control socket is refused; nothing is left
running after shutdown. Outcomes go to chaos.json in the cluster's directory."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
import schemathesis
import zmq
from hypothesis import HealthCheck, given, settings

from cluster.wire import protocol as P
from tests.cluster_harness import LaunchedCluster, cluster_config

pytestmark = pytest.mark.integration
MODEL = "smollm2-135m-instruct"
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def add(a, b):",
           "The sky is", "My favourite fruit is", "Water boils at", "Hello, my name is"]
MAX_TOKENS = 6
NUM_REQUESTS = 104
REQUEST_TIMEOUT_S = 240
WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")
KV_FAULTS = "drop=0.03,corrupt=0.03,seed=7"
FUZZ_EXAMPLES = 15                                     # per operation


def launch_2p2d(name: str, kv_faults: str) -> LaunchedCluster:
    """2 prefill + 2 decode, CURVE on, quick failure detection, the KV fault switch set; with
    each prompt's greedy answer from before any fault (benchmarks/chaos.py launches it too)."""
    toml = cluster_config("[[prefill]]\ncount = 2\n\n[[decode]]\ncount = 2\n",
                          extra="heartbeat_interval = 0.5\nheartbeat_dead_after = 4.0\n"
                                "decode_ready = 20\nkv_transfer = 20\nrequest = 180\n"
                                "[recovery]\nrestart_reset_after = 30\n"
                                "[security]\ncurve = \"on\"\n")
    toml = toml.replace("[model]\n", "[model]\nmax_model_len = 512\n", 1)
    c = LaunchedCluster(toml, name, env={"PDCLUSTER_TEST_KV_FAULT": kv_faults})
    c.reference = {p: complete(c, p) for p in PROMPTS}
    return c


@pytest.fixture(scope="module")
def cluster():
    c = launch_2p2d("hardening", KV_FAULTS)
    c.http = httpx.Client(base_url=c.base_url, timeout=60)
    yield c
    c.http.close()
    c.stop()


def complete(c, prompt: str) -> str:
    r = c.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def worker_up(c) -> set[str]:
    return set(re.findall(r'pdcluster:worker_up\{role="\w+",worker="([\w-]+)"\} 1', c.metrics()))


def token_usage(c) -> dict[str, float]:
    return {w: float(v) for w, v in
            re.findall(r'pdcluster:token_usage\{role="\w+",worker="([\w-]+)"\} (\S+)', c.metrics())}


def wait_until(cond, timeout: float, step: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(step)
    return False


# ------------------------------------------------------------------------- hostile input

HOSTILE = [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": Infinity}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": -Infinity}'),
    ("/v1/completions", b'{"prompt": "hi", "seed": 18446744073709551616}'),
    ("/v1/completions", b'{"prompt": "hi", "top_k": 18446744073709551616}'),
    ("/v1/completions", b'{"prompt": [1, 2, 49152]}'),
    ("/v1/completions", b'{"prompt": [1, -5]}'),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["x"] * 5000}).encode()),
    ("/v1/completions", json.dumps({"prompt": "hi", "stop": ["y" * 100_000]}).encode()),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                         "logprobs": True, "top_logprobs": 21}).encode()),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 1e999}'),
    ("/v1/completions", b"[" * 50_000 + b"]" * 50_000),
    ("/v1/completions", b'{"prompt": "' + b"word " * 400_000 + b'"}'),
    ("/v1/completions", b"\xff\xfe not json"),
]


def test_hostile_requests_get_4xx_and_nothing_restarts(cluster):
    pids = cluster.worker_pids()
    assert set(pids) == set(WORKERS)
    for path, body in HOSTILE:
        resp = cluster.http.post(path, content=body, headers={"content-type": "application/json"})
        assert 400 <= resp.status_code < 500, (path, body[:80], resp.text[:300])
        assert set(resp.json()) == {"error"}
    resp = cluster.http.post("/v1/completions", content=b"{" + b" " * (9 << 20) + b"}")
    assert resp.status_code == 413
    resp = cluster.http.post("/v1/completions", json={"prompt": "hi"},
                             headers={"Authorization": "Bearer caf\u00e9".encode("latin-1")})
    assert resp.status_code < 500
    assert cluster.worker_pids() == pids                 # same processes: none restarted
    assert complete(cluster, PROMPTS[0]) == cluster.reference[PROMPTS[0]]


def fuzz_schema(cluster):
    """The router's own OpenAPI document, generations bounded to a few tokens."""
    doc = cluster.http.get("/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        for key in ("max_tokens", "max_completion_tokens"):
            if key in body["properties"]:
                body["properties"][key] = {"type": "integer", "minimum": 1, "maximum": 4}
        body["required"] = sorted(set(body["required"]) | {"max_tokens"})
    return schemathesis.openapi.from_dict(doc)


def test_fuzzed_requests_never_get_a_server_error(cluster):
    pids = cluster.worker_pids()
    seen: dict[str, int] = {}
    for result in fuzz_schema(cluster).get_all_operations():
        operation = result.ok()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case):
            response = case.call(base_url=cluster.base_url, timeout=120)
            seen[operation.label] = seen.get(operation.label, 0) + 1
            assert response.status_code < 500, (case.path, case.body, response.text[:300])
        call()
    assert seen.get("POST /v1/completions", 0) >= 10, seen
    assert seen.get("POST /v1/chat/completions", 0) >= 10, seen
    assert cluster.worker_pids() == pids                 # same processes: none restarted


def test_fuzz_left_every_worker_in_place(cluster):
    assert set(cluster.worker_pids()) == set(WORKERS)
    assert complete(cluster, PROMPTS[1]) == cluster.reference[PROMPTS[1]]


# ------------------------------------------------------------------------------ security

def test_unauthenticated_control_socket_is_refused(cluster):
    router = next(p for p in psutil.Process(cluster.proc.pid).children(recursive=True)
                  if "cluster.router" in " ".join(p.cmdline()))
    cmd = router.cmdline()
    endpoint = cmd[cmd.index("--control") + 1]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"decode-1")          # tries to take over a worker's id
    sock.connect(endpoint)
    sock.send_multipart(P.encode(P.Abort("x", "intruder")))
    try:
        refused = re.compile(r'pdcluster:rejected_frames_total\{[^}]*worker="router"[^}]*\} [1-9]')
        assert wait_until(lambda: refused.search(cluster.metrics()), 20)
        assert "decode-1" in worker_up(cluster)
    finally:
        sock.close()
        ctx.term()


# --------------------------------------------------------------------------------- chaos

def one_request(c, i: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    t0 = time.monotonic()
    out = {"i": i, "prompt": prompt, "text": "", "error": None, "num_chunks": 0}
    try:
        stream = c.client.with_options(timeout=REQUEST_TIMEOUT_S).completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices:
                out["text"] += chunk.choices[0].text
                out["num_chunks"] += 1
    except openai.APITimeoutError as e:
        out["error"], out["hung"] = f"timeout: {e}", True
    except openai.APIError as e:
        out["error"] = str(getattr(e, "message", e)) or type(e).__name__
    out["seconds"] = time.monotonic() - t0
    return out


def test_chaos_under_load_every_request_ends_correctly_or_with_a_reason(cluster):
    c = cluster
    done: list[dict] = []
    faults: list[dict] = []
    pool = ThreadPoolExecutor(12)
    futures = [pool.submit(lambda i=i: done.append(one_request(c, i)) or i)
               for i in range(NUM_REQUESTS)]

    def in_flight() -> int:
        return sum(f.running() for f in futures)

    watchers = []

    def inject(name: str, after_done: int, act) -> None:
        wait_until(lambda: len(done) >= after_done, 120, 0.1)
        fault = {"fault": name, "in_flight": in_flight(), "t": time.monotonic()}
        faults.append(fault)
        act()
        watchers.append(threading.Thread(target=watch_recovery, args=(fault,), daemon=True))
        watchers[-1].start()

    def watch_recovery(fault: dict) -> None:
        """Seconds from the fault (SIGCONT for a stop) until its worker serves again."""
        wid = fault["fault"].split()[-1]
        ok = wait_until(lambda: wid in worker_up(c) and (
            wid == "decode-1" or c.worker_pids().get(wid) not in (None, pids[wid])), 240, 0.2)
        fault["seconds_to_recover"] = round(time.monotonic() - fault["t"], 1) if ok else None

    pids = c.worker_pids()
    inject("SIGKILL prefill-0", 15, lambda: os.kill(pids["prefill-0"], signal.SIGKILL))
    inject("SIGKILL decode-0", 35, lambda: os.kill(pids["decode-0"], signal.SIGKILL))

    def stop_and_continue():
        os.kill(pids["decode-1"], signal.SIGSTOP)
        time.sleep(6)                                    # past heartbeat_dead_after
        os.kill(pids["decode-1"], signal.SIGCONT)
        faults[-1]["t"] = time.monotonic()               # recovery counts from SIGCONT
    inject("SIGSTOP 6 s + SIGCONT decode-1", 55, stop_and_continue)
    for f in futures:
        f.result(timeout=REQUEST_TIMEOUT_S + 60)
    pool.shutdown()

    # every worker back (the launcher restarted the killed ones), pages all returned
    for w in watchers:
        w.join(250)
    assert wait_until(lambda: worker_up(c) >= set(WORKERS), 240)
    assert wait_until(lambda: set(token_usage(c)) >= set(WORKERS) and
                      not any(token_usage(c).values()), 60), token_usage(c)

    identical = [d for d in done if d["error"] is None and d["text"] == c.reference[d["prompt"]]]
    failed = [d for d in done if d["error"] is not None and not d.get("hung")]
    hung = [d for d in done if d.get("hung") or d["seconds"] > REQUEST_TIMEOUT_S]
    wrong = [d for d in done if d["error"] is None and d["text"] != c.reference[d["prompt"]]]
    kv_failures = re.findall(r"pdcluster:kv_transfer_failures_total\{[^}]*\} (\S+)", c.metrics())
    summary = {"faults": [{k: v for k, v in f.items() if k != "t"} for f in faults],
               "kv_faults": KV_FAULTS, "num_requests": len(done),
               "completed_identical": len(identical), "failed_with_reason": len(failed),
               "hung": len(hung), "wrong_or_duplicated": len(wrong),
               "pages_leaked": sum(1 for v in token_usage(c).values() if v),
               "kv_transfer_failures_total": sum(float(v) for v in kv_failures),
               "errors": sorted({d["error"][:160] for d in failed})}
    with open(os.path.join(c.dir, "chaos.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    assert len(done) == NUM_REQUESTS
    assert not hung and not wrong, summary
    assert all(d["error"].strip() for d in failed), summary
    assert all(f["seconds_to_recover"] is not None for f in faults), summary
    assert len(identical) >= NUM_REQUESTS // 2, summary


def test_shutdown_leaves_no_process(cluster):
    config = cluster.config_path
    assert cluster.stop() == []
    left = [p for p in psutil.process_iter(["cmdline"])
            if config in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]
