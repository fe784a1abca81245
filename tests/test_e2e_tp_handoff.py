"""KV handoff between workers of different tensor-parallel sizes, through `pdcluster launch`: prefill
tp=3 -> decode tp=1 and prefill tp=1 -> decode tp=3 give the greedy text of the unsplit engine, each
decode rank landing exactly its share of the KV bytes, verified by checksums each rank computes over
its own heads; each rank keeps a host tier of its own heads in step with rank 0's; a decode rank
killed mid-stream takes its worker down whole, the streams end (resumed or with an error event,
never hanging), all its ranks come back, and nothing is left after shutdown.

The model is a tiny Llama with the default model's head shape in small (3 KV heads, so tp = 1 and 3
both split it) and seeded random weights: eight worker processes load it in no time on two cores.
"""
import json
import os
import re
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from cluster.engine.llm import LLM
from cluster.sampling_params import SamplingParams
from tests.cluster_harness import LaunchedCluster
from tests.engine_fixtures import TINY_LLAMA

pytestmark = pytest.mark.integration

MODEL = "tiny-3kv"
TINY_3KV = {**TINY_LLAMA, "vocab_size": 49152, "hidden_size": 96, "intermediate_size": 192,
            "num_attention_heads": 6, "num_key_value_heads": 3, "max_position_embeddings": 4096}   # the default tokenizer's vocabulary
PROMPTS = ["The capital of France is", "Once upon a time"]
MAX_TOKENS = 6
STREAM_TOKENS = 300      # cut at its first tokens: the rank dies long before the end
# round robin per role over sorted ids: request k goes to prefill-(k % 2) and decode-(k % 2)
GROUPS = """
[[prefill]]
count = 1
tp = 3
[[prefill]]
count = 1
[[decode]]
count = 1
[[decode]]
count = 1
tp = 3
"""
PER_RANK = re.compile(r"request (\S+): KV heads from ((?:prefill|decode)-\d) landed per rank \(bytes\): \[([\d, ]+)\]")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny-3kv")
    (d / "config.json").write_text(json.dumps(TINY_3KV))
    return str(d)


@pytest.fixture(scope="module")
def cluster(model_dir):
    c = LaunchedCluster(f"""
[model]
name = "{MODEL}"
path = "{model_dir}"
load_format = "dummy"

[scheduler]
num_pages = 32
max_running_requests = 8

[cache]
host_tier_gb = 0.001

[timeouts]
register = 240

[kv_transfer]
verify = true

[recovery]
restart_workers = true
{GROUPS}""", "tp-handoff")
    try:
        wait_for(lambda: len(registered(c)) == 4, 240, "all four workers registered", c)
        yield c
    finally:
        c.stop()


def registered(cluster) -> list[str]:
    return [w["worker_id"] for w in httpx.get(cluster.base_url + "/admin/workers", timeout=5).json()["workers"]]


def wait_for(cond, timeout_s: float, what: str, cluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (httpx.HTTPError, openai.APIError):
            pass
        time.sleep(1)
    pytest.fail(f"not {what} within {timeout_s}s:\n{cluster.output()}")


def landed_per_rank(cluster, decode: str) -> list[tuple[str, list[int]]]:
    return [(m.group(2), [int(x) for x in m.group(3).split(",")]) for m in PER_RANK.finditer(cluster.log(decode))]


def decode_bytes(cluster) -> dict[str, float]:
    """Each decode worker's kv_transfer_bytes_total (summed over its backend labels)."""
    out: dict[str, float] = {}
    for line in cluster.metrics().splitlines():
        if line.startswith("pdcluster:kv_transfer_bytes_total{") and 'role="decode"' in line:
            worker = re.search(r'worker="([^"]+)"', line).group(1)
            out[worker] = out.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_prefill_and_decode_of_other_tp_sizes_give_the_unsplit_greedy_text(cluster, model_dir):
    llm = LLM(MODEL, path=model_dir, load_format="dummy", num_pages=64)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    # the first to prefill-0 (tp=3) + decode-0 (tp=1); the second crosswise, with n = 2: decode-1's
    # ranks each fork the sibling from their own heads of the landed KV
    for n, prompt, out in zip((1, 2), PROMPTS, outs):
        r = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                              n=n, extra_body={"ignore_eos": True})
        assert [c.text for c in r.choices] == [llm.tokenizer.decode(out.token_ids)] * n, prompt
    [(src0, whole)] = landed_per_rank(cluster, "decode-0")
    [(src1, shares)] = landed_per_rank(cluster, "decode-1")
    assert (src0, src1) == ("prefill-0", "prefill-1")
    for decode in ("decode-0", "decode-1"):   # verify: the heads every rank landed, against every prefill rank's
        assert re.search(r"landed per rank \(bytes\): \[[\d, ]+\], checksum verified", cluster.log(decode))
    # every rank of decode-1 landed its one KV head of three: a third of what decode-0 (all heads) did
    assert len(whole) == 1 and len(shares) == 3 and len(set(shares)) == 1
    # each worker's kv_transfer_bytes_total counts every one of its ranks (rank 0 reports for all)
    wait_for(lambda: decode_bytes(cluster) == {"decode-0": sum(whole), "decode-1": sum(shares)}, 60,
             f"kv_transfer_bytes_total of {whole} and {shares}", cluster)


def host_hit_tokens(cluster, worker: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in cluster.metrics().splitlines()
               if line.startswith("pdcluster:prefix_cache_hit_tokens_total{") and 'tier="host"' in line
               and f'worker="{worker}"' in line)


def test_ranks_keep_host_tiers_of_their_own_heads_in_step_with_rank_0(cluster, model_dir):
    """[cache] host_tier_gb with tp = 3: a prompt that others pushed out of prefill-0's small device
    pool to the host tier comes back from every rank's tier, and the greedy text stays the unsplit
    engine's."""
    prompt = "Remember this: " + " ".join(f"item{i}" for i in range(40))
    others = [f"Unrelated {i}: " + " ".join(f"filler{i}x{j}" for j in range(40)) for i in range(8)]
    llm = LLM(MODEL, path=model_dir, load_format="dummy", num_pages=64)
    want = llm.tokenizer.decode(llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
                                .token_ids)
    complete = lambda p, n: cluster.client.completions.create(  # noqa: E731 - round robin: both prefill workers
        model=MODEL, prompt=p, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert [complete(prompt, MAX_TOKENS) for _ in range(2)] == [want] * 2
    for other in others:                      # four each: more than a 32-page pool keeps
        complete(other, 1)
    assert [complete(prompt, MAX_TOKENS) for _ in range(2)] == [want] * 2
    wait_for(lambda: host_hit_tokens(cluster, "prefill-0") > 0, 60, "prefill-0 hit its host tier", cluster)


def test_killed_decode_rank_mid_stream_restarts_the_worker_whole(cluster):
    before = {rank: pid for (wid, rank), pid in cluster.rank_pids().items() if wid == "decode-1"}
    assert sorted(before) == [0, 1, 2]
    outcomes, started = [], threading.Barrier(3, timeout=120)

    def stream(prompt):
        try:
            s = cluster.client.completions.create(model=MODEL, prompt=prompt, max_tokens=STREAM_TOKENS, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
            first = True
            for _ in s:
                if first:
                    first = False
                    started.wait()
            outcomes.append("done")
        except openai.APIError as e:     # the error event of a stream that could not go on
            outcomes.append(f"error: {e}")
        except threading.BrokenBarrierError:
            outcomes.append("done")

    threads = [threading.Thread(target=stream, args=(p,)) for p in PROMPTS]   # one on each pair
    for t in threads:
        t.start()
    started.wait()
    os.kill(before[2], signal.SIGKILL)
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), f"a stream hung:\n{cluster.output()}"
    assert len(outcomes) == 2, outcomes
    assert re.search(r"worker decode-1 is gone \(.*\): 1 request\(s\) affected", cluster.log("router")), \
        f"decode-1 died with no stream on it: {outcomes}"

    def restarted():
        now = {rank: pid for (wid, rank), pid in cluster.rank_pids().items() if wid == "decode-1"}
        return sorted(now) == [0, 1, 2] and not set(now.values()) & set(before.values())
    wait_for(restarted, 240, "decode-1 restarted with all its ranks", cluster)
    wait_for(lambda: len(registered(cluster)) == 4, 240, "decode-1 registered again", cluster)


def test_a_decode_worker_of_three_ranks_switches_to_prefill_in_place(cluster, model_dir):
    """Its ranks now serve reads of their pools (zmq: its pool is in no shared segment) to decode-0."""
    resp = httpx.post(cluster.base_url + "/admin/workers/decode-1/role", json={"role": "prefill"}, timeout=10)
    assert resp.status_code == 202, resp.text
    roles = lambda: {w["worker_id"]: w["role"] for w in  # noqa: E731
                     httpx.get(cluster.base_url + "/admin/workers", timeout=5).json()["workers"]}
    wait_for(lambda: roles().get("decode-1") == "prefill" and len(roles()) == 4, 120, "decode-1 a prefill worker",
             cluster)
    llm = LLM(MODEL, path=model_dir, load_format="dummy", num_pages=64)
    want = llm.tokenizer.decode(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0]
                                .token_ids)
    for _ in range(3):            # round robin over the three prefill workers, decode-0 the only decode one
        r = cluster.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
        assert r.choices[0].text == want
    assert [shares for src, shares in landed_per_rank(cluster, "decode-0") if src == "decode-1"]


def test_stop_leaves_no_rank_behind(cluster):
    cluster.descendants = psutil.Process(cluster.proc.pid).children(recursive=True)
    assert len(cluster.rank_pids()) == 8
    assert cluster.stop() == []
