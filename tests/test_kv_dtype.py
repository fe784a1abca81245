"""`[model] kv_dtype`: a bfloat16 KV cache under float32 activations on the CPU. The flat decode loop and the
modules stay equal bit for bit over it, every attention path reads it (one request in place, scattered pages,
several requests, a prefill over a cached prefix), the KV handoff carries its bytes, and float32 (auto) is
still the reference."""
from __future__ import annotations

import json

import pytest
import torch

from cluster.config import ConfigError, load_config
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.kv_transfer.checksum import kv_checksum
from tests.engine_fixtures import TINY_LLAMA, batch_input, prefill_input
from tests.inprocess_workers import Pair, run_unified
from tests.test_cpu_decode import LAYOUTS, _decode_logits

pytestmark = pytest.mark.usefixtures("single_thread")


def _runner(tmp_path, kv_dtype: str, **config) -> ModelRunner:
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, **config}))
    return ModelRunner(load_model("tiny", str(tmp_path), load_format="dummy"), num_pages=32, page_size=4,
                       kv_dtype=kv_dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", [16, 24])   # softmax scale folded into q's rope rows, or not
def test_flat_decode_over_bfloat16_kv_equals_the_module_path(tmp_path, monkeypatch, layout, head_dim):
    runner = _runner(tmp_path, "bfloat16", head_dim=head_dim)
    assert runner.kv_pool.kv.dtype == torch.bfloat16 and runner.kv_fingerprint()["dtype"] == "bfloat16"
    tables = LAYOUTS[layout]
    prompts = [[5 + i, 9, 11, 3 + 2 * i, 7][: 3 + i] for i in range(len(tables))]
    flat = _decode_logits(runner, prompts, tables, True, monkeypatch)
    assert runner.model._decode_plan is not None
    assert torch.equal(flat, _decode_logits(runner, prompts, tables, False, monkeypatch))
    reference = _decode_logits(_runner(tmp_path, "auto", head_dim=head_dim), prompts, tables, True, monkeypatch)
    assert not torch.equal(flat, reference)   # the KV really is rounded
    torch.testing.assert_close(flat, reference, atol=0.05, rtol=0.05)


def test_auto_is_the_model_dtype(tmp_path):
    assert _runner(tmp_path, "auto").kv_pool.kv.dtype == torch.float32


def test_prefill_over_a_cached_bfloat16_prefix_matches_one_prefill(tmp_path):
    runner = _runner(tmp_path, "bfloat16")
    ids, pages = [5, 9, 11, 3, 7, 2, 8, 6, 4], [1, 2, 3]
    whole = runner.forward(prefill_input(ids, pages, return_logits=True)).logits
    runner.forward(prefill_input(ids[:5], [4, 5, 6]))
    rest = runner.forward(prefill_input(ids[5:], [4, 5, 6], prefix_len=5, return_logits=True)).logits
    torch.testing.assert_close(rest, whole[5:], atol=0.05, rtol=0.05)   # the prefix read back in bfloat16


def test_handoff_carries_bfloat16_kv_bytes(tmp_path):
    src, dst = _runner(tmp_path, "bfloat16"), _runner(tmp_path, "bfloat16")
    ids = [5, 9, 11, 3, 7, 2]
    src.forward(prefill_input(ids, [1, 2, 3]))
    kv = src.export_kv([1, 2, 3], len(ids))
    assert kv.dtype == torch.bfloat16 and kv.numel() * 2 == src.kv_pool.request_bytes(len(ids))
    dst.import_kv([5, 6, 7], kv)
    back = dst.export_kv([5, 6, 7], len(ids))
    assert torch.equal(back, kv) and kv_checksum(back) == kv_checksum(kv)
    # decode goes on from the imported KV as from the exporter's own
    steps = [batch_input([[4]], [len(ids)], [pages], is_decode=True) for pages in ([1, 2, 3], [5, 6, 7])]
    for fi in steps:
        fi.return_logits = True
    assert torch.equal(src.forward(steps[0]).logits, dst.forward(steps[1]).logits)


def test_kv_dtype_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nkv_dtype = "bfloat16"\n')
    assert load_config(path, env={}).model.kv_dtype == "bfloat16"
    path.write_text('[model]\nkv_dtype = "float16"\n')
    with pytest.raises(ConfigError, match="kv_dtype"):
        load_config(path, env={})
    path.write_text('[model]\ndevice = "cuda"\ndtype = "bfloat16"\nkv_dtype = "float32"\n')
    with pytest.raises(ConfigError, match="CPU-only"):
        load_config(path, env={})


def test_a_bfloat16_handoff_between_workers_decodes_as_the_unified_worker(loaded):
    """Prefill -> decode over real zmq frames, checksummed: the same greedy ids as one worker, both in bfloat16."""
    prompts = ["The capital of France is", "Once upon a time"]
    ref = run_unified(loaded, prompts, overlap=True, kv_dtype="bfloat16")
    pair = Pair(loaded, kv_dtype="bfloat16")
    assert pair.prefill.runner.kv_pool.kv.dtype == pair.decode.runner.kv_pool.kv.dtype == torch.bfloat16
    for i, p in enumerate(prompts):
        pair.submit(f"r{i}", p)
    try:
        assert pair.run(len(prompts)) == ref
        assert pair.dc.errors() == [] and pair.pc.errors() == []
    finally:
        pair.close()
