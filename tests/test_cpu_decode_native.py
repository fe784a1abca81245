"""The native flat decode loop (cpu_decode_native.py): its RoPE over the widened qkv rows against apply_rope
(bit for bit), its RMSNorm against torch's (bfloat16 results, a last-bit difference in a few elements), and
its decode logits against the module path's with the same native weights, fed the same tokens."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cluster.engine import cpu_decode, cpu_decode_native, quant_linear
from cluster.engine.loader import load_model
from cluster.engine.model_runner import ModelRunner
from cluster.engine.rotary import RotaryEmbedding, apply_rope
from tests.engine_fixtures import batch_input, prefill_input

pytestmark = pytest.mark.usefixtures("single_thread")


def _plan(heads=9, kv_heads=3, head_dim=64, hidden=96, inter=40):
    layer = SimpleNamespace(gate_up=torch.empty(2 * inter, hidden), qkv_bias=None)
    return SimpleNamespace(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, hidden=hidden, eps=1e-5,
                           layers=[layer])


@pytest.mark.parametrize("rows", [1, 3])
def test_rope_over_the_widened_rows_equals_apply_rope(rows):
    torch.manual_seed(0)
    plan = _plan()
    b = cpu_decode_native.NativeBuffers(plan, rows)
    qkv = torch.randn(rows, 15, 64)
    cos, sin = RotaryEmbedding(64, 512, 10000.0).lookup(torch.tensor([7, 300, 511][:rows]), torch.float32)
    b.qkv.copy_(qkv)
    b.first_half_again.copy_(b.first_half)
    torch.mul(b.rotated, sin, out=b.rotated_sin)
    b.qk.mul_(cos).add_(b.rotated_sin)
    assert torch.equal(b.qk, apply_rope(qkv[:, :12], cos, sin))
    assert torch.equal(b.kv, torch.cat((apply_rope(qkv[:, 9:12], cos, sin), qkv[:, 12:]), dim=1))
    assert torch.equal(b.kv_by_head, b.kv.transpose(0, 1)) and torch.equal(b.q, b.qkv[:, :9])


def test_norm_rounds_as_torch_rms_norm_but_for_a_last_bit_here_and_there():
    """`x / sqrt(sum(x^2) + H eps) * (w sqrt(H))` against `torch.rms_norm`, both rounded to bfloat16:
    at most one bfloat16 step apart, and in at most 1 element in 1000."""
    torch.manual_seed(0)
    plan = _plan(hidden=576)
    b = cpu_decode_native.NativeBuffers(plan, 4)
    weight = torch.randn(576)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(4, 576) * scale
        fast = cpu_decode_native._norm(x, weight * math.sqrt(576), b).float()
        exact = torch.rms_norm(x, (576,), weight, 1e-5).bfloat16().float()
        ulp = exact.abs() * 2 ** -7
        assert ((fast - exact).abs() <= ulp).all()
        assert (fast != exact).float().mean() <= 1e-3


def _fed_logits(runner: ModelRunner, prompts: list[list[int]], tables: list[list[int]],
                fed: list[list[int]]) -> torch.Tensor:
    """Prefill each prompt on its pages, then decode all of them together fed `fed[r][i]` at step i (the same
    tokens for every path compared, whatever each would pick): the decode logits, steps stacked."""
    for p, pages in zip(prompts, tables):
        runner.forward(prefill_input(p, pages))
    steps = []
    for i in range(min(len(f) for f in fed)):
        fi = batch_input([[f[i]] for f in fed], [len(p) + i for p in prompts], tables, is_decode=True)
        fi.return_logits = True
        steps.append(runner.forward(fi).logits)
    return torch.cat(steps)


@pytest.fixture(scope="module")
def native_model():
    return load_model(cpu_weights="native")


PROMPTS = ["The printing press changed Europe because", "def add(a, b):", "Once upon a time"]
LAYOUTS = {   # one request on consecutive pages (span views), on scattered pages, three requests
    "one_in_place": [[2, 3]],
    "one_scattered": [[9, 4]],
    "three": [[1, 2], [12, 8], [20, 21]],
}


@pytest.mark.skipif(not quant_linear.native_kernels_available(), reason="torch's packed kernels are not vectorized")
@pytest.mark.parametrize("layout,kv_dtype", [(layout, "auto") for layout in LAYOUTS] + [("one_in_place", "bfloat16")])
def test_native_flat_decode_stays_within_bfloat16_noise_of_the_module_path(native_model, monkeypatch, layout, kv_dtype):
    """Both paths fed the same tokens: their logits differ by the last-bit roundings of the norm only, which
    bfloat16 activations carry through 30 layers into ~1% logit noise, as any change of summation order
    does (test_engine_runner.py); native weights' own error against float32 weights is larger (max abs
    logit difference per step ~0.3: `benchmarks/cpu_decode.py --agreement`)."""
    runner = ModelRunner(native_model, num_pages=32, page_size=16, kv_dtype=kv_dtype)
    tables = LAYOUTS[layout]
    prompts = [runner.tokenizer.encode(p) for p in PROMPTS[:len(tables)]]
    fed = [[504, 7510, 1757, 4247, 1910, 975][i::len(tables)] for i in range(len(tables))]

    def logits(flat: bool) -> torch.Tensor:
        monkeypatch.setattr(cpu_decode, "FLAT_DECODE", flat)
        return _fed_logits(runner, prompts, tables, fed)

    flat, modules = logits(True), logits(False)
    plan = runner.model._decode_plan
    assert plan is not None and plan.native and len(tables) in plan.native_buffers
    diff = (flat - modules).abs().amax(dim=-1)
    assert diff.max() < 0.35, diff
    assert ((flat - modules).norm(dim=-1) / modules.norm(dim=-1)).max() < 0.03
    assert (flat.argmax(-1) == modules.argmax(-1)).float().mean() >= 5 / 6


@pytest.mark.skipif(not quant_linear.native_kernels_available(), reason="torch's packed kernels are not vectorized")
def test_native_flat_decode_stays_near_the_float32_path(native_model):
    """The native loop's decode logits against float32 weights (the transformers-exact path), both fed the same
    tokens after the same prompt: within native weights' known error (`--agreement 48`: max abs difference per
    step median 0.29, max 0.44 on a 240-token prompt), the same argmax."""
    runners = [ModelRunner(m, num_pages=16, page_size=16) for m in (native_model, load_model(cpu_weights="float32"))]
    prompt = runners[0].tokenizer.encode("The printing press changed Europe because")
    pages, fed = [2, 3], [504, 7510, 1757, 4247, 1910, 975]
    native, ref = [_fed_logits(runner, [prompt], [pages], [fed]) for runner in runners]
    assert runners[0].model._decode_plan.native and runners[0].model._decode_plan.native_buffers
    assert (native - ref).abs().amax(dim=-1).max() < 1.0
    assert ((native - ref).norm(dim=-1) / ref.norm(dim=-1)).max() < 0.05
    assert torch.equal(native.argmax(-1), ref.argmax(-1))


def test_greedy_ids_pick_argmax_first_maximum_and_nan():
    from cluster.engine.model_runner import greedy_ids
    torch.manual_seed(0)
    for _ in range(50):
        logits = torch.randint(0, 5, (3, 4099)).float()   # many ties
        logits[0, torch.randint(0, 4099, (2,))] = float("nan")
        logits[1] = float("-inf")
        assert torch.equal(greedy_ids(logits), logits.argmax(dim=-1))


def _pack_int4(model) -> None:
    """Every projection of a dummy-weight model as int4 groups of 32 (`w = q * scale + low`), attached as
    native weights: what a Q4_1 GGUF file gives (quant_linear.attach_packed)."""
    from cluster.engine.gguf_blocks import GROUP, QuantBlocks
    cfg, blocks = model.config, {}
    splits = {"qkv_proj": (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)),
              "gate_up_proj": (("gate_proj", None), ("up_proj", None)), "o_proj": (("o_proj", None),),
              "down_proj": (("down_proj", None),)}
    for name, p in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        proj = prefix.rpartition(".")[2]
        if leaf != "weight" or proj not in splits:
            continue
        sizes = [s or p.shape[0] // len(splits[proj]) for _, s in splits[proj]]
        for (hf, _), w in zip(splits[proj], p.detach().split(sizes)):
            groups = w.reshape(w.shape[0], -1, GROUP)
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-8)
            q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
            blocks[f"model.{prefix.rpartition('.')[0]}.{hf}.weight"] = QuantBlocks(q.view(w.shape), scale, low)
    quant_linear.attach_packed(model, blocks)


@pytest.mark.skipif(not quant_linear.native_kernels_available(), reason="torch's packed kernels are not vectorized")
def test_native_flat_decode_with_qkv_biases(tmp_path, monkeypatch):
    """A Qwen2-style tiny model (q/k/v biases, head_dim 32, softmax scale not a power of two) packed as int4:
    the native loop (bias added to the widened qkv rows) within bfloat16 noise of the module path."""
    import json
    from tests.engine_fixtures import TINY_LLAMA
    (tmp_path / "config.json").write_text(json.dumps({**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"],
                                                      "model_type": "qwen2", "head_dim": 32, "hidden_size": 96}))
    loaded = load_model("tiny", str(tmp_path), load_format="dummy")
    with torch.no_grad():
        for layer in loaded.model.layers:
            layer.self_attn.qkv_proj.bias.normal_(0, 0.5)
    _pack_int4(loaded.model)
    runner = ModelRunner(loaded, num_pages=16, page_size=4)
    prompt, pages, fed = [5, 9, 11, 3, 7], [2, 3, 4], [13, 21, 8, 40]

    def logits(flat: bool) -> torch.Tensor:
        monkeypatch.setattr(cpu_decode, "FLAT_DECODE", flat)
        return _fed_logits(runner, [prompt], [pages], [fed])

    flat, modules = logits(True), logits(False)
    assert runner.model._decode_plan.native and runner.model._decode_plan.layers[0].qkv_bias is not None
    assert ((flat - modules).norm(dim=-1) / modules.norm(dim=-1)).max() < 0.03
