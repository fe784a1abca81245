"""The MLA decode kernel compiled for an H100 (sm_90a) with Triton and its bundled ptxas, no GPU needed
(benchmarks/mla_compile_check.py): the table's configuration and the `tma_pages` walks compile, spill
nothing, and the walks read through TMA with as many page buffers as the pipeline promises. Run in a
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
}
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
        assert figures["spill_store_bytes"] == 0 and figures["registers"] <= 255, (name, figures)
        assert figures["shared_kb"] <= 113, (name, figures)          # two programs fit an SM's 227 KB


def test_tma_walks_read_pages_by_tma_into_num_stages_minus_one_buffers(compiled):
    assert compiled["table"]["tma_copies"] == 0
    for name in ("tma", "tma_chunks"):
        assert compiled[name]["tma_copies"] > 0 and compiled[name]["buffers"] == 4, (name, compiled[name])
    # page ids loaded in the loop take half the stages: 7 stages, 3 page buffers
    assert compiled["tma_ids_in_loop"]["buffers"] == 3
