"""Write a model directory for `load_format = "dummy"` runs on machines without the GGUF:
a `config.json` of the shape asked for (Llama, or SDAR for the DLLM runs) and the default model's `tokenizer.json`.

    python benchmarks/dummy_model.py OUT_DIR --preset llama-3.1-8b   # or tiny-llama

The vocabulary is the default tokenizer's (49,152 tokens) so every sampled id detokenizes;
everything else (layers, heads, KV bytes per token) is the named model's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRESETS = {
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # SDAR-1.7B's shape (Qwen3 layout, block diffusion) for the DLLM runs; the mask placeholder is
    # the vocabulary's last id, as the default tokenizer has no mask token
    "sdar-1.7b": {"architectures": ["SDARForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
                  "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
                  "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                  "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "tiny-llama": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                   "rope_theta": 10000.0, "max_position_embeddings": 8192},
}


def write_model_dir(out: str, preset: str) -> str:
    from cluster.engine.gguf_metadata import gguf_tokenizer
    from cluster.engine.model_files import default_gguf_path
    tok = gguf_tokenizer(default_gguf_path())
    os.makedirs(out, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "vocab_size": tok.vocab_size, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "bos_token_id": tok.bos_token_id, "eos_token_id": sorted(tok.eos_token_ids), **PRESETS[preset]}
    if "SDARForCausalLM" in config["architectures"]:
        config["mask_token_id"] = tok.vocab_size - 1
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(tok.backend.to_str())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    a = ap.parse_args()
    print(write_model_dir(a.out, a.preset))
