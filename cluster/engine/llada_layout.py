"""LLaDA checkpoints (upstream `LLaDAModelLM`) as the engine's Llama layout.

LLaDA's Llama block is a Llama decoder layer under other names (OLMo lineage), with the same
half-split rotary layout, so loading is a rename: `model.transformer.blocks.N.{q,k,v}_proj`
-> `model.layers.N.self_attn.{q,k,v}_proj`, `attn_out` -> `o_proj`, `ff_proj` (the SiLU-gated
branch) -> `mlp.gate_proj`, `up_proj` -> `mlp.up_proj`, the block's `ff_out` -> `mlp.down_proj`,
`attn_norm` / `ff_norm` -> `input_layernorm` / `post_attention_layernorm`, `transformer.wte`
-> `embed_tokens`, `transformer.ln_f` -> `norm`, `transformer.ff_out` -> `lm_head`. The
config.json keys (`d_model`, `n_heads`, `mlp_hidden_size`, ...) map to Llama's.
`cluster/engine/loader.py` lists this layout in its table of checkpoint layouts.
"""
from __future__ import annotations

import re
from typing import Optional

ARCHITECTURES = ("LLaDAModelLM",)

_BLOCK_NAMES = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
_BLOCK = re.compile(r"^(?:model\.)?transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP = re.compile(r"^(?:model\.)?transformer\.(\w+)\.(weight|bias)$")


def llada_name_map(name: str) -> Optional[str]:
    """Upstream LLaDA tensor name -> HF Llama name (None: not a weight, e.g. a rotary buffer)."""
    m = _BLOCK.match(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    m = _TOP.match(name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    if "rotary" in name or name.endswith("inv_freq"):
        return None
    raise KeyError(f"unexpected LLaDA weight {name!r}")


def llada_config_map(cfg: dict) -> dict:
    """LLaDA config.json -> the Llama keys `ModelConfig.from_hf_config` reads."""
    unsupported = {"block_type": cfg.get("block_type", "llama") != "llama",
                   "alibi": bool(cfg.get("alibi")), "rope": not cfg.get("rope", True),
                   "include_bias": bool(cfg.get("include_bias")), "scale_logits": bool(cfg.get("scale_logits")),
                   "input_emb_norm": bool(cfg.get("input_emb_norm")),
                   "layer_norm_type": cfg.get("layer_norm_type", "rms") != "rms",
                   "attention_layer_norm": bool(cfg.get("attention_layer_norm"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"LLaDA config with unsupported settings: {bad}")
    d_model, n_heads = cfg["d_model"], cfg["n_heads"]
    kv_heads = 1 if cfg.get("multi_query_attention") else (cfg.get("n_kv_heads") or n_heads)
    out = {
        "architectures": list(cfg.get("architectures") or ARCHITECTURES),
        "vocab_size": cfg.get("embedding_size") or cfg["vocab_size"],
        "hidden_size": d_model,
        "intermediate_size": cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model,
        "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": kv_heads,
        "head_dim": d_model // n_heads,
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_theta": cfg.get("rope_theta", 10000.0),
        "max_position_embeddings": cfg.get("max_sequence_length", 4096),
        "tie_word_embeddings": bool(cfg.get("weight_tying", False)),
        "attention_bias": bool(cfg.get("include_qkv_bias", False)),
        "eos_token_id": cfg.get("eos_token_id"),
        "bos_token_id": cfg.get("bos_token_id"),
    }
    for key in ("mask_token_id", "pad_token_id"):
        if key in cfg:
            out[key] = cfg[key]
    return out

