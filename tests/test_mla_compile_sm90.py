"""The MLA decode kernel compiled for an H100 (sm_90a) with Triton and its bundled ptxas, no GPU needed
(benchmarks/mla_compile_check.py): the table's configuration and the `tma_pages` walks compile, spill
nothing in their main loop, fit the programs per SM they promise (register caps included), and read
through TMA with as many page buffers as the pipeline promises. Run in a
subprocess: the interpreted kernel tests need Triton imported under TRITON_INTERPRET in this one."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "table": "DecodeConfig(fused_merge=True)",
    "tma": "DecodeConfig(fused_merge=True, tma_pages=True, prefetch_pages=True, block_n=16, num_stages=5)",
    "tma_chunks": "DecodeConfig(fused_merge=True, tma_pages=True, prefetch_pages=True, block_n=16, num_stages=5, "
                  "r_chunks=4, num_warps=4)",
    "tma_ids_in_loop": "DecodeConfig(fused_merge=True, tma_pages=True, block_n=16, num_stages=7)",
    "tma_pairs": "DecodeConfig(fused_merge=True, tma_pages=True, page_pairs=True, block_n=32, num_stages=5, "
                 "merge_at_once=True)",
    "tma_chunks_capped": "DecodeConfig(fused_merge=True, tma_pages=True, block_n=16, num_stages=7, r_chunks=8, "
                         "num_warps=8, max_registers=128)",
    "three_per_sm": "DecodeConfig(fused_merge=True, tma_pages=True, block_n=16, num_stages=5, r_chunks=4, num_warps=4, "
                    "max_registers=168)",
}
SPILLING_OUTSIDE_THE_LOOP = {"three_per_sm"}     # 24 B, after the walk over whole tiles
SCRIPT = """
import json, sys
from benchmarks.mla_compile_check import compile_for_h100, launch_args
from cluster.engine.triton_mla_config import DecodeConfig
configs = json.loads(sys.argv[1])
print(json.dumps({k: compile_for_h100(*launch_args(eval(v), 16)) for k, v in configs.items()}))
"""


@pytest.fixture(scope="module")
def compiled():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("no triton")
    from triton.backends.nvidia.compiler import get_ptxas
    if not os.path.exists(get_ptxas(90).path):
        pytest.skip("no ptxas")
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CONFIGS)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_table_and_tma_walks_compile_for_h100_without_spills(compiled):
    for name, figures in compiled.items():
        assert figures["loop_spills"] == 0 and figures["registers"] <= 255, (name, figures)
        assert figures["spill_store_bytes"] == 0 or name in SPILLING_OUTSIDE_THE_LOOP, (name, figures)
        assert figures["shared_kb"] <= 113 and figures["per_sm"] >= 2, (name, figures)   # two fit an SM


def test_register_caps_fit_the_programs_per_sm_they_promise(compiled):
    assert compiled["tma_chunks_capped"]["registers"] <= 128 and compiled["tma_chunks_capped"]["per_sm"] == 2
    assert compiled["three_per_sm"]["registers"] <= 168 and compiled["three_per_sm"]["per_sm"] == 3


def test_tma_walks_read_pages_by_tma_into_num_stages_minus_one_buffers(compiled):
    assert compiled["table"]["tma_copies"] == 0
    for name in ("tma", "tma_chunks"):
        assert compiled[name]["tma_copies"] > 0 and compiled[name]["buffers"] == 4, (name, compiled[name])
    # page ids loaded in the loop take half the stages: 7 stages, 3 page buffers; 5 stages, 2 of 2 pages each
    assert compiled["tma_ids_in_loop"]["buffers"] == 3 and compiled["tma_chunks_capped"]["buffers"] == 3
    assert compiled["tma_pairs"]["buffers"] == 2 and compiled["tma_pairs"]["tma_copies"] > 0


def test_programs_per_sm_from_registers_shared_memory_and_warps():
    from benchmarks.mla_compile_check import programs_per_sm
    assert programs_per_sm(240, 4, 90 * 1024) == 2           # registers: 2 x 30,720 of 65,536
    assert programs_per_sm(166, 8, 98 * 1024) == 1           # 168 x 32 x 8 = 43,008 registers
    assert programs_per_sm(128, 8, 98 * 1024) == 2
    assert programs_per_sm(168, 4, 70 * 1024) == 3
    assert programs_per_sm(128, 4, 110 * 1024) == 2          # shared memory: 228 KB
    assert programs_per_sm(32, 16, 1024) == 4                 # warps: 64


def test_loop_spills_counts_local_memory_in_the_main_loop_only():
    from benchmarks.mla_compile_check import loop_spills
    sass = """
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   LDL R3, [R1] ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0060*/               @!P1 BRA 0x50 ;
        /*0070*/                   STL [R1+0x4], R5 ;
        /*0080*/                   BRA 0x10 ;
    """
    assert loop_spills(sass) == 1          # the first loop's LDL; the unconditional back edge is no loop
    assert loop_spills("/*0010*/ NOP ;") == 0
