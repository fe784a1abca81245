"""ModelRunner invariances on the real SmolLM2 weights: batching, chunking, prefix reuse, KV handoff."""
from __future__ import annotations

import pytest
import torch

from cluster.engine.llm import LLM
from cluster.engine.model_runner import ModelRunner
from cluster.sampling_params import SamplingParams
from tests.engine_fixtures import batch_input, greedy_decode, prefill_input

PROMPTS = [
    "The capital of France is", "List three colors:", "In 1969, the first humans landed on",
    "def add(a, b):\n    return", "Water boils at a temperature of",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy",
    "Translate to French: Good morning, how are you today? I hope the weather is nice where you live.",
    "Q: What is the largest planet in the solar system?\nA:",
]
NUM_NEW = 12

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llm():
    # float32 weights: these compare forwards that split the same work differently at 1e-4; bfloat16
    # activations (native weights) turn such summation-order noise into ~1% logit noise
    return LLM(num_pages=1024, page_size=16, max_prefill_tokens=64, cpu_weights="float32")


def _pages(runner: ModelRunner, num_tokens: int) -> list[int]:
    return runner.page_allocator.allocate(-(-num_tokens // runner.page_size))


def test_request_alone_equals_request_in_mixed_batch_of_8(llm):
    tok = llm.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) >= 6
    alone = []
    for ids in prompts:
        pages = _pages(llm.runner, len(ids) + NUM_NEW)
        alone.append(greedy_decode(llm.runner, ids, NUM_NEW, pages))
        llm.runner.page_allocator.free(pages)
    # max_prefill_tokens=64: the batched prefill also splits some prompts across forwards
    batched = llm.generate(prompts, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    assert [o.token_ids for o in batched] == alone
    llm.runner.page_allocator.check_integrity(held=[])


def test_prefill_in_two_chunks_equals_one(llm):
    runner = llm.runner
    ids = llm.tokenizer.encode(PROMPTS[6])
    pages = _pages(runner, len(ids))
    one = runner.forward(prefill_input(ids, pages, return_logits=True)).logits
    kv_one = runner.export_kv(pages, len(ids))
    cut = 13   # not page aligned on purpose
    first = runner.forward(prefill_input(ids[:cut], pages, sample=False, return_logits=True)).logits
    second = runner.forward(prefill_input(ids[cut:], pages, prefix_len=cut, return_logits=True)).logits
    torch.testing.assert_close(torch.cat([first, second]), one, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner.export_kv(pages, len(ids)), kv_one, atol=1e-4, rtol=1e-4)
    runner.page_allocator.free(pages)


def test_extend_after_shared_prefix_pages_equals_full_prefill(llm):
    """Prefix caching: a second request reuses the first one's full prefix pages and extends."""
    runner = llm.runner
    ids = llm.tokenizer.encode(PROMPTS[6] + " " + PROMPTS[5])
    prefix = 2 * runner.page_size
    full_pages = _pages(runner, len(ids))
    full = runner.forward(prefill_input(ids, full_pages, return_logits=True)).logits
    owner = _pages(runner, prefix)
    runner.forward(prefill_input(ids[:prefix], owner, sample=False))
    reuse = owner + _pages(runner, len(ids) - prefix)
    ext = runner.forward(prefill_input(ids[prefix:], reuse, prefix_len=prefix, return_logits=True)).logits
    torch.testing.assert_close(ext, full[prefix:], atol=1e-4, rtol=1e-4)
    runner.page_allocator.free(full_pages + reuse)


def test_export_import_into_other_pages_then_decode_gives_same_tokens(llm):
    runner = llm.runner
    ids = llm.tokenizer.encode(PROMPTS[2])
    src = _pages(runner, len(ids) + NUM_NEW)
    expected = greedy_decode(runner, ids, NUM_NEW, src)
    first = runner.forward(prefill_input(ids, src)).next_token_ids.tolist()
    kv = runner.export_kv(src, len(ids))
    assert kv.shape == (30, 2, len(ids), 3, 64) and kv.is_contiguous() and kv.dtype == torch.float32
    # a second runner (the decode worker) over the same weights, pages at other offsets
    other = ModelRunner(llm.loaded, num_pages=64, page_size=runner.page_size)
    other.page_allocator.allocate(5)
    dst = _pages(other, len(ids) + NUM_NEW)[::-1]   # deliberately out of order
    other.import_kv(dst, kv)
    torch.testing.assert_close(other.export_kv(dst, len(ids)), kv, atol=0, rtol=0)
    out = first
    for _ in range(NUM_NEW - 1):
        fi = batch_input([[out[-1]]], [len(ids) + len(out) - 1], [dst], is_decode=True)
        out.append(int(other.forward(fi).next_token_ids[0]))
    assert out == expected
    runner.page_allocator.free(src)


def test_future_token_ids_resolve_from_previous_forward(llm):
    runner = llm.runner
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    tables = [_pages(runner, len(p) + 4) for p in prompts]
    fi = batch_input(prompts, [0] * 3, tables)
    fi.future_slots = [7, 8, 9]
    first = runner.forward(fi).next_token_ids
    assert runner.future_map[7:10].tolist() == first.tolist()
    seq = [len(p) for p in prompts]
    explicit = runner.forward(batch_input([[int(t)] for t in first], seq, tables, is_decode=True)).next_token_ids
    future = batch_input([[-8], [-9], [-10]], seq, tables, is_decode=True)   # -(slot + 1)
    assert runner.forward(future).next_token_ids.tolist() == explicit.tolist()
    for t in tables:
        runner.page_allocator.free(t)


def test_bidirectional_tail_sees_later_block_tokens_and_keeps_prefix_causal(llm):
    runner = llm.runner
    ids = llm.tokenizer.encode(PROMPTS[7])
    k = 5
    pages = _pages(runner, len(ids))
    causal = runner.forward(prefill_input(ids, pages, return_logits=True)).logits
    bidi = runner.forward(prefill_input(ids, pages, return_logits=True, bidirectional_len=k)).logits
    one = runner.forward(prefill_input(ids, pages, return_logits=True, bidirectional_len=1)).logits
    torch.testing.assert_close(one, causal, atol=1e-4, rtol=1e-4)   # masked vs SDPA-causal kernels
    torch.testing.assert_close(bidi[:-k], causal[:-k], atol=1e-4, rtol=1e-4)   # before the block: unchanged
    assert (bidi[-k] - causal[-k]).abs().max() > 1e-2               # block start now sees the block
    changed = list(ids)
    changed[-1] = changed[-2]
    bidi2 = runner.forward(prefill_input(changed, pages, return_logits=True, bidirectional_len=k)).logits
    assert (bidi2[-k] - bidi[-k]).abs().max() > 1e-3                # ... including its last token
    # the block extended over a cached prefix equals the block inside a full prefill
    runner.forward(prefill_input(ids[:-k], pages, sample=False))
    ext = runner.forward(prefill_input(ids[-k:], pages, prefix_len=len(ids) - k, return_logits=True,
                                       bidirectional_len=k)).logits
    torch.testing.assert_close(ext, bidi[-k:], atol=1e-4, rtol=1e-4)
    runner.page_allocator.free(pages)


def test_mixed_extend_and_decode_in_one_forward(llm):
    runner = llm.runner
    a, b = (llm.tokenizer.encode(p) for p in PROMPTS[:2])
    pa, pb = _pages(runner, len(a) + 2), _pages(runner, len(b))
    ta = greedy_decode(runner, a, 2, pa)
    tb = runner.forward(prefill_input(b, pb)).next_token_ids.tolist()
    runner.forward(prefill_input(a, pa))
    fi = batch_input([[ta[0]], b], [len(a), 0], [pa, pb])
    assert runner.forward(fi).next_token_ids.tolist() == [ta[1], tb[0]]
    runner.page_allocator.free(pa + pb)


def test_kv_fingerprint(llm):
    assert llm.runner.kv_fingerprint() == {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
                                           "dtype": "float32", "page_size": 16, "layout": "kv"}
