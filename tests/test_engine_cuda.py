"""The engine and the overlap loop on a CUDA device (skipped where there is none).

Run on a GPU machine: `python -m pytest tests/test_engine_cuda.py`. Small random models
against transformers on the same device; the scheduler's forward runs on a CUDA stream.
"""
import time

import pytest
import torch

from cluster.config import SchedulerConfig
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.unified import UnifiedScheduler
from tests.engine_fixtures import batch_input, greedy_decode
from tests.queue_control import QueueControl
from tests.test_engine_loader import _save_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["llama3", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_on_cuda_matches_transformers(tmp_path, kind, dtype):
    path, ref_model = _save_tiny(tmp_path, kind)
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


class ByteTokenizer:
    """Dummy weights carry no tokenizer (and the GPU machine has no default model)."""
    eos_token_ids = frozenset()

    def encode(self, text):
        return [ord(c) % 1000 + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return ""


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
    from tests.test_handoff_inprocess import Pair, run_unified
    loaded = load_model("llama-3.2-1b", load_format="dummy", dtype="bfloat16", device="cuda")
    loaded._tokenizer = ByteTokenizer()
    prompts = ["the quick brown fox", "jumps over", "the lazy dog again and again"]
    ref = run_unified(loaded, prompts, overlap=True)
    pair = Pair(loaded)
    try:
        for i, p in enumerate(prompts):
            pair.submit(f"r{i}", p)
        assert pair.run(len(prompts)) == ref
        assert pair.decode.heartbeat_stats()["kv_transfer_bytes_total"] > 0
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
