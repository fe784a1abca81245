"""The engine and the overlap loop on a CUDA device (skipped where there is none).

Run on a GPU machine: `python -m pytest tests/test_engine_cuda.py`. Small random models
against transformers on the same device; the scheduler's forward runs on a CUDA stream; the
Triton paged-attention kernels against SDPA on gathered pages over random shapes; CUDA graph
decode against eager and torch-backend decode; no host sync in sampling or in a graphed step
but the token copy; the host KV tier's copies, whole and layer by layer (per-layer events)
(deferred reads of the overlapped unified worker: test_deferred_reads_cuda.py).
"""
import random
import time
import warnings

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.engine.cuda_graphs import batch_buckets
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.engine.sampler import sample
from cluster.sampling_params import SamplingParams
from cluster.unified import UnifiedScheduler
from tests.engine_fixtures import ByteTokenizer, batch_input, greedy_decode, prefill_input, save_tiny_hf, tiny_cuda_runner
from tests.paged_attention_cases import (extend_args, extend_limits, make_case, reference_decode,
                                         reference_extend)
from tests.queue_control import QueueControl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_on_cuda_matches_transformers(tmp_path, kind, dtype):
    path, ref_model = save_tiny_hf(tmp_path, kind)
    runner = ModelRunner(load_model("tiny", path=path, dtype=dtype, device="cuda"), 32, 8, "cuda", dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (70, 9)]
    tables = [runner.page_allocator.allocate(-(-len(p) // 8)) for p in prompts]
    fi = batch_input(prompts, [0, 0], tables)
    fi.return_logits = True
    ours = runner.forward(fi).logits.float().cpu()
    ref_model = ref_model.to("cuda", getattr(torch, dtype))
    with torch.no_grad():
        ref = torch.cat([ref_model(torch.tensor([p], device="cuda")).logits[0] for p in prompts]).float().cpu()
    if dtype == "float32":
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)   # TF32-free fp32 on CUDA
    else:
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
        assert cos.min() > 0.99, cos.min()


def test_batched_decode_on_cuda_equals_alone():
    loaded = load_model("tiny-llama", load_format="dummy", device="cuda")
    loaded._tokenizer = ByteTokenizer()
    runner = ModelRunner(loaded, 256, 16, "cuda", "float32")
    prompts = [[(7 * i + j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(6)]
    alone = []
    for p in prompts:
        pages = runner.page_allocator.allocate(4)
        alone.append(greedy_decode(runner, p, 12, pages))
        runner.page_allocator.free(pages)
    ctl = QueueControl()
    s = UnifiedScheduler(SchedulerConfig(overlap=True), "unified-0", runner, ctl)
    assert s.executor._stream is not None            # the forward runs on its own CUDA stream
    for i, p in enumerate(prompts):
        ctl.generate(f"r{i}", p, max_tokens=12, ignore_eos=True)
    last, deadline = None, time.monotonic() + 120
    while len(ctl.finished()) < len(prompts) and time.monotonic() < deadline:
        last = s.overlap_step(last)
    out = ctl.outputs()
    assert [out[f"r{i}"] for i in range(len(prompts))] == alone


def test_kv_handoff_between_cuda_workers_equals_unified():
    from tests.inprocess_workers import Pair, run_unified
    loaded = load_model("llama-3.2-1b", load_format="dummy", dtype="bfloat16", device="cuda")
    loaded._tokenizer = ByteTokenizer()
    prompts = ["the quick brown fox", "jumps over", "the lazy dog again and again"]
    ref = run_unified(loaded, prompts, overlap=True)
    pair = Pair(loaded)
    try:
        for i, p in enumerate(prompts):
            pair.submit(f"r{i}", p)
        assert pair.run(len(prompts)) == ref
        assert pair.decode.heartbeat_gauges().kv_transfer_bytes_total > 0
    finally:
        pair.close()


def decode_batch(runner, prompts, steps):
    """Prefill each prompt, then decode all together; -> generated ids per request."""
    tables = [runner.page_allocator.allocate(8) for _ in prompts]
    out = [[int(runner.forward(batch_input([p], [0], [t])).next_token_ids[0])] for p, t in zip(prompts, tables)]
    for _ in range(steps):
        fi = batch_input([[o[-1]] for o in out], [len(p) + len(o) - 1 for p, o in zip(prompts, out)], tables,
                         is_decode=True)
        for o, t in zip(out, runner.forward(fi).next_token_ids.tolist()):
            o.append(t)
    return out


def test_cuda_graph_decode_equals_eager_decode(monkeypatch):
    loaded = load_model("tiny-llama", load_format="dummy", device="cuda")
    loaded._tokenizer = ByteTokenizer()
    prompts = [[(11 * i + j) % 700 + 3 for j in range(n)] for i, n in enumerate((3, 17, 30, 1, 15))]
    graphed = ModelRunner(loaded, 128, 16, "cuda", "float32")
    assert graphed.decode_graphs is not None
    with_graphs = decode_batch(graphed, prompts, 20)          # crosses page boundaries (16, 32)
    assert graphed.decode_graphs.steps                          # at least one bucket was captured
    monkeypatch.setenv("PDCLUSTER_CUDA_GRAPHS", "0")
    eager = ModelRunner(loaded, 128, 16, "cuda", "float32")
    assert eager.decode_graphs is None
    assert decode_batch(eager, prompts, 20) == with_graphs


def _random_shape(seed: int):
    g = random.Random(seed)
    kvh, group = g.choice([1, 2, 8]), g.choice([1, 3, 4, 8])
    return (g.choice([1, 5, 33]), kvh * group, kvh, g.choice([64, 128]), g.choice([1, 8, 16, 32]),
            g.choice([40, 700, 3000]))


@pytest.mark.parametrize("seed", range(8))
def test_triton_decode_matches_sdpa_on_gathered_pages(seed):
    from cluster.engine import triton_attention
    b, h, kvh, d, ps, max_len = _random_shape(seed)
    dtype = torch.bfloat16 if seed % 2 else torch.float32
    case = make_case(seed, b, h, kvh, d, ps, max_len, dtype, "cuda")
    out = triton_attention.decode(case["q_dec"], case["k_cache"], case["v_cache"], case["pages"],
                                  case["page_start"], case["seq_lens"], d ** -0.5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), reference_decode(case, d ** -0.5), atol=tol, rtol=tol)


@pytest.mark.parametrize("seed", range(8))
def test_triton_extend_over_paged_prefix_matches_sdpa(seed):
    from cluster.engine import triton_attention
    b, h, kvh, d, ps, max_len = _random_shape(seed + 100)
    dtype = torch.bfloat16 if seed % 2 else torch.float32
    case = make_case(seed, b, h, kvh, d, ps, max_len, dtype, "cuda", max_extend=150)
    limits = extend_limits(case, bidirectional=seed % 3 == 0)
    out = triton_attention.extend(*extend_args(case, limits), d ** -0.5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), reference_extend(case, limits, d ** -0.5), atol=tol, rtol=tol)



def test_decode_graphs_captured_at_startup_for_every_batch_bucket():
    runner = tiny_cuda_runner()
    assert runner.attention_backend == "triton"
    graphs = runner.decode_graphs
    assert set(graphs.steps) == set(batch_buckets(96)) and graphs.buckets[-1] == 96
    assert graphs.capture_s > 0


def test_graph_decode_equals_eager_and_torch_decode_at_large_batch(monkeypatch):
    prompts = [[(13 * i + j) % 900 + 3 for j in range(1 + (7 * i) % 40)] for i in range(70)]   # bucket 80
    graphed = decode_batch(tiny_cuda_runner(), prompts, 20)
    eager = decode_batch(tiny_cuda_runner(monkeypatch, PDCLUSTER_CUDA_GRAPHS="0"), prompts, 20)
    torch_path = decode_batch(tiny_cuda_runner(monkeypatch, PDCLUSTER_ATTENTION="torch"), prompts, 20)
    assert graphed == eager == torch_path


def test_chunked_prefill_over_cached_prefix_matches_whole_prompt():
    runner = tiny_cuda_runner()
    prompt = [(5 * j) % 800 + 3 for j in range(75)]
    pages = runner.page_allocator.allocate(5)
    whole = runner.forward(prefill_input(prompt, pages, return_logits=True)).logits
    runner.forward(prefill_input(prompt[:37], pages, sample=False))   # 37: the chunk ends inside a page
    tail = runner.forward(prefill_input(prompt[37:], pages, prefix_len=37, return_logits=True)).logits
    torch.testing.assert_close(tail, whole[37:], atol=1e-4, rtol=1e-4)


def test_sampling_on_cuda_never_waits_for_the_device():
    logits = torch.randn(6, 5000, device="cuda")
    sps = [SamplingParams(logit_bias=[[5, 50.0]]), SamplingParams(temperature=0.8, top_k=20),
           SamplingParams(temperature=1.0, top_p=0.5),
           SamplingParams(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1),
           SamplingParams(temperature=0.7, seed=3, logprobs=True, top_logprobs=3),
           SamplingParams(min_tokens=2, max_tokens=4)]
    gens = [None, None, None, None, torch.Generator().manual_seed(3), None]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids, lps, top = sample(logits, sps, gens, [[], [], [], [1, 2, 2, 7], [], []], [0, 0, 0, 0, 0, 2],
                          [frozenset(), frozenset(), frozenset(), frozenset(), frozenset(), frozenset({0, 1})])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    again, _, _ = sample(logits[4:5], sps[4:5], [torch.Generator().manual_seed(3)], [], [], [])
    assert int(ids[4]) == int(again[0])                                   # seeded: same draw alone
    assert int(ids[1]) in set(logits[1].topk(20).indices.tolist())
    assert int(ids[5]) not in (0, 1) and lps is not None and top[0].shape == (6, 3)
    assert int(ids[0]) == 5                                               # logit_bias


def test_graph_decode_step_never_waits_and_overlapped_steps_equal_waited_ones():
    runner = tiny_cuda_runner()
    prompts = [[(3 * i + j) % 500 + 3 for j in range(5 + 4 * i)] for i in range(3)]
    tables = [runner.page_allocator.allocate(8) for _ in prompts]
    waited = [[int(runner.forward(batch_input([p], [0], [t])).next_token_ids[0])] for p, t in zip(prompts, tables)]
    for _ in range(6):   # reference: each step waited for, its tokens fed back from the host
        fi = batch_input([[o[-1]] for o in waited], [len(p) + len(o) - 1 for p, o in zip(prompts, waited)], tables,
                         is_decode=True)
        for o, t in zip(waited, runner.forward(fi).next_token_ids.tolist()):
            o.append(t)
    slots = [0, 1, 2]
    first = batch_input([[o[0]] for o in waited], [len(p) for p in prompts], tables, is_decode=True)
    first.future_slots = slots
    runner.forward(first)
    outs = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 6):   # launched back to back: inputs are the previous step's futures
                fi = batch_input([[-(s + 1)] for s in slots], [len(p) + step for p in prompts], tables,
                                 is_decode=True)
                fi.future_slots = slots
                outs.append(runner.forward(fi, wait=False))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    steps = [o.wait().next_token_ids.tolist() for o in outs]
    assert [[row[i] for row in steps] for i in range(3)] == [o[2:] for o in waited]


def _host_tier(layers: int = 4):
    from cluster.engine.host_tier import HostTier
    from cluster.engine.kv_cache import KVPool
    return HostTier(KVPool(layers, 2, 64, 16, 16, torch.bfloat16, torch.device("cuda")), 8)


def test_host_tier_write_back_and_load_round_trip_every_layer_on_cuda():
    tier = _host_tier()
    kv = tier.pool.kv
    kv.copy_(torch.randn(kv.shape, device="cuda"))
    before = kv[:, :, :, [1, 5]].clone()
    tier.write([1, 5], [0, 6])
    kv[:, :, :, [1, 5]] = 0
    tier.load([0, 6], [9, 3])
    tier.seal(1)
    tier.launching(1)
    tier.flush()
    assert torch.equal(kv[:, :, :, [9, 3]], before)


def test_host_tier_layer_loads_land_before_the_layer_that_waits_for_their_event():
    """Layer by layer on CUDA: every layer issued at once on the load stream with an event each;
    work the forward stream launches after `before_layer(i)` sees layer i's pages even while the
    load stream is held back (a sleep queued ahead of the copies)."""
    tier = _host_tier()
    tier.layerwise_min_bytes = 0
    for layer in range(4):
        tier.kv[layer, 3] = layer + 1
        tier.kv[layer, 4] = 10 * (layer + 1)
    tier.load([3, 4], [7, 2])
    tier.seal(1)
    tier.launching(1)
    torch.cuda.synchronize()
    with torch.cuda.stream(tier.load_stream):
        torch.cuda._sleep(200_000_000)            # ~0.1 s: the copies queue behind it
    tier.flush(layerwise=True)
    assert len(tier._layer_events) == 4 and not tier.loading and tier.num_layerwise_loads == 1
    seen = []
    for layer in range(4):
        tier.before_layer(layer)
        seen.append(tier.pool.kv[layer][:, :, [7, 2]].float())   # launched on the forward stream
    tier.end_forward()
    torch.cuda.synchronize()
    for layer, got in enumerate(seen):
        assert (got[:, :, 0] == layer + 1).all() and (got[:, :, 1] == 10 * (layer + 1)).all()
