"""The MLA decode sweep's CPU-side parts (benchmarks/mla_decode_candidates.py, mla_precompile.py,
mla_sweep_report.py): candidates named by their brief, one precompile per kernel, the configs that broke a
worker's CUDA context, and the report's per-head lines and TABLE to paste."""
import pytest

from benchmarks.mla_decode_candidates import candidates, from_brief
from benchmarks.mla_precompile import broken_contexts, compile_key, distinct_kernels
from benchmarks.mla_sweep_report import head_lines, summary, table_block
from cluster.engine import triton_mla_config
from cluster.engine.triton_mla_config import DecodeConfig


@pytest.mark.parametrize("heads", [16, 32, 64, 128])
def test_candidates_start_with_the_table_row_and_round_trip_through_their_brief(heads):
    import torch
    found = candidates(heads, quick=True)
    assert found[0] == triton_mla_config.decode_config(heads, torch.bfloat16)
    assert len({c.brief() for c in found}) == len(found)
    assert all(from_brief(c.brief()) == c for c in found)
    assert from_brief("default") == DecodeConfig()
    with pytest.raises(ValueError, match="not DecodeConfig fields"):
        from_brief("block_n=16,stages=3")


def test_one_precompile_per_kernel_unless_a_single_split_drops_the_merge():
    base = DecodeConfig(fused_merge=True, tma_pages=True, block_n=16, num_stages=7)
    same = [base, DecodeConfig(fused_merge=True, tma_pages=True, block_n=16, num_stages=7, programs_per_sm=1.5)]
    assert distinct_kernels({16: same}, batch=64, num_sms=132) == [(16, base)]
    # 64 requests x 2 head blocks of 16 on 132 SMs: one split (no merge) at 1 program per SM, 3 at 3
    one_split = DecodeConfig(block_h=16, programs_per_sm=1)
    kernels = distinct_kernels({32: [one_split, DecodeConfig(block_h=16, programs_per_sm=3)]}, batch=64, num_sms=132)
    assert len(kernels) == 2 and compile_key(kernels[0][1]) == compile_key(kernels[1][1])


def test_only_each_workers_first_broken_context_is_blamed():
    errors = [{"heads": 16, "config": "a", "worker": 0, "error": "RuntimeError: CUDA error: an illegal memory access"},
              {"heads": 16, "config": "b", "worker": 0, "error": "RuntimeError: CUDA error: an illegal memory access"},
              {"heads": 32, "config": "c", "worker": 1, "error": "OutOfResources: shared memory"},
              {"config": "worker", "error": "killed after 120 s"}]
    assert broken_contexts(errors) == {(16, "a")}


def _result():
    best = DecodeConfig(fused_merge=True, tma_pages=True, page_pairs=True, block_n=32, num_stages=5)
    rows = [{"heads": 16, "config": best.brief(), "ms": 0.066, "confirm_ms": 0.064, "ok": True},
            {"heads": 16, "config": "fused_merge=True", "ms": None, "ok": False, "error": "CompilationError"},
            {"heads": 32, "config": "block_h=16", "ms": None, "ok": False, "skipped": "time budget"}]
    return {"mla_batch": 64, "mla_context": 2048, "latent_mb": 151.0, "copy_gb_s": 3036.0, "latent_read_ms": 0.0497,
            "mla_sweep": rows, "mla_best": {"16": {"config": best.brief(), "code": best.code(), "ms": 0.064,
                                                   "ratio": 0.064 / 0.0497, "table_ms": 0.0672}}}, best


def test_report_gives_a_line_per_head_count_and_the_table_to_paste():
    out, best = _result()
    line, = head_lines(out)
    assert line.startswith("16 heads: best 0.0640 ms = 1.29x (goal met)") and best.code() in line
    block = table_block(out)
    namespace = {"DecodeConfig": DecodeConfig, "dict": dict, "int": int}
    exec(block, namespace)                          # pastes as Python: the winner and the other rows as they are
    assert namespace["TABLE"] == {**triton_mla_config.TABLE, 16: best}
    text = summary(out)
    assert "1 failed or wrong: 16: fused_merge=True" in text and "1 skipped: 32: block_h=16 (time budget)" in text
