"""Packed GGUF weights on the CPU (cpu_weights = "native"): block decoding, kernels against a
dequantize-then-matmul reference, and the default model's accuracy against the float32 path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.engine import quant_linear
from cluster.engine.gguf_blocks import from_gguf
from cluster.engine.linear import linear
from cluster.engine.quant_linear import PACKED_MAX_ROWS, PackedWeight

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.skipif(not quant_linear.native_kernels_available(),
                                 reason="torch's packed kernels are not vectorized on this CPU")]

# relative error of the packed matmul against x @ dequantize(GGUF)^T: bfloat16 activations, outputs,
# scales and zeros; Q6_K also requantizes to int8 per row
TOLERANCE = {T.Q4_0: 0.01, T.Q4_1: 0.01, T.Q4_K: 0.01, T.Q8_0: 0.01, T.Q6_K: 0.02}


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random raw GGUF blocks [rows, row bytes]: random bytes with sane float16 scales in place."""
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)

    def put_f16(offset, lo, hi):
        raw[:, offset:offset + 2] = rng.uniform(lo, hi, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    if qtype in (T.Q4_0, T.Q8_0):
        put_f16(0, 1e-3, 2e-2)
    elif qtype == T.Q4_1:
        put_f16(0, 1e-3, 2e-2), put_f16(2, -0.2, 0.0)
    elif qtype == T.Q4_K:
        put_f16(0, 1e-4, 1e-3), put_f16(2, 1e-4, 1e-3)
    elif qtype == T.Q6_K:
        put_f16(type_size - 2, 1e-4, 1e-3)
    return raw.reshape(rows, -1)


def dequantized(raw: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).copy())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K, T.Q8_0])
def test_gguf_blocks_decode_exactly_like_gguf(qtype):
    raw = random_blocks(qtype, 64, 512)
    assert torch.equal(from_gguf(raw, qtype, 64, 512).dequantize(), dequantized(raw, qtype))


@pytest.mark.parametrize("qtype", sorted(TOLERANCE))
@pytest.mark.parametrize("num_rows", [1, 5, PACKED_MAX_ROWS])
def test_packed_matmul_matches_dequantize_then_matmul_on_random_blocks(qtype, num_rows):
    raw = random_blocks(qtype, 96, 512, seed=int(qtype))
    packed = PackedWeight.fuse([from_gguf(raw, qtype, 96, 512)])
    x = torch.randn(num_rows, 512, generator=torch.Generator().manual_seed(1))
    out = packed.matmul(x.bfloat16())
    assert relative_error(out, x @ dequantized(raw, qtype).T) < TOLERANCE[qtype]
    # and the float32 copy holds exactly what the kernels multiply: only summation order differs
    same_values = x.bfloat16().float() @ packed.dequantize().T
    torch.testing.assert_close(out, same_values, rtol=0, atol=2 ** -7 * float(same_values.abs().max()))


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
def test_packed_matmul_matches_dequantize_then_matmul_on_default_model(name):
    from cluster.engine.model_files import default_gguf_path
    t = next(t for t in gguf.GGUFReader(default_gguf_path()).tensors if t.name == name)
    cols, rows = (int(d) for d in t.shape)
    packed = PackedWeight.fuse([from_gguf(t.data, t.tensor_type, rows, cols)])
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(2))
    assert relative_error(packed.matmul(x.bfloat16()), x @ dequantized(t.data, t.tensor_type).T) < 0.01


def test_fused_shards_of_mixed_kinds_fall_back_to_int8_rows():
    q4, q6 = random_blocks(T.Q4_1, 64, 256), random_blocks(T.Q6_K, 32, 256)
    packed = PackedWeight.fuse([from_gguf(q4, T.Q4_1, 64, 256), from_gguf(q6, T.Q6_K, 32, 256)])
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    ref = x @ torch.cat([dequantized(q4, T.Q4_1), dequantized(q6, T.Q6_K)]).T
    assert packed.shape == (96, 256) and relative_error(packed.matmul(x.bfloat16()), ref) < 0.02


def test_small_and_large_forwards_agree_row_for_row():
    """Decode-sized inputs take the packed kernel, larger ones a bfloat16 GEMM over the weights rounded to
    bfloat16: a row's output differs between the two by about one bfloat16 rounding (of the weights,
    not only of the output), so batching changes a request's numbers by noise, not more."""
    raw = random_blocks(T.Q4_1, 128, 256)
    packed = PackedWeight.fuse([from_gguf(raw, T.Q4_1, 128, 256)])
    weight = torch.nn.Parameter(packed.dequantize(), requires_grad=False)
    weight.packed = packed
    x = torch.randn(PACKED_MAX_ROWS + 8, 256, generator=torch.Generator().manual_seed(4))
    large, small = linear(x, weight), linear(x[:PACKED_MAX_ROWS], weight)
    assert relative_error(small, large[:PACKED_MAX_ROWS]) < 2 ** -8


@pytest.fixture(scope="module")
def both_paths():
    from cluster.engine.llm import LLM
    return {mode: LLM(num_pages=256, page_size=16, cpu_weights=mode) for mode in ("native", "float32")}


def test_native_weights_stay_close_to_the_float32_path_on_the_reference_prompts(both_paths):
    """The accuracy report: prompt logits (max abs error, max relative error of a position's logits
    vector) and how many greedy tokens agree
    with the float32 path, which matches transformers (test_engine_reference.py)."""
    from cluster.sampling_params import SamplingParams
    from tests.engine_fixtures import prefill_input
    from tests.test_engine_reference import CHATS, NUM_GREEDY, PLAIN
    native, ref = both_paths["native"], both_paths["float32"]
    prompts = PLAIN + [ref.tokenizer.apply_chat_template(m) for m in CHATS]
    max_abs = max_rel = 0.0
    for prompt in prompts:
        ids = ref.tokenizer.encode(prompt)
        logits = {}
        for mode, llm in both_paths.items():
            pages = llm.runner.page_allocator.allocate(-(-len(ids) // llm.runner.page_size))
            logits[mode] = llm.runner.forward(prefill_input(ids, pages, return_logits=True)).logits
            llm.runner.page_allocator.free(pages)
        diff = logits["native"] - logits["float32"]
        max_abs = max(max_abs, float(diff.abs().max()))
        max_rel = max(max_rel, float((diff.norm(dim=-1) / logits["float32"].norm(dim=-1)).max()))
        assert logits["native"][-1].argmax() == logits["float32"][-1].argmax(), prompt
    greedy = SamplingParams(max_tokens=NUM_GREEDY, ignore_eos=True)
    agree = []
    for a, b in zip(native.generate(prompts, greedy), ref.generate(prompts, greedy)):
        agree.append(next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), NUM_GREEDY))
    print(f"\nnative vs float32 on {len(prompts)} reference prompts: logits max abs error {max_abs:.3f}, "
          f"max relative error {max_rel:.4f}; greedy tokens equal before the first difference: {agree} "
          f"of {NUM_GREEDY} each")
    assert max_rel < 0.1 and max_abs < 2.0
    assert sum(agree) >= len(prompts) * NUM_GREEDY // 4   # the first quarter of the text, on average
