"""Checkpoint layouts of the sparse and latent-attention families (`cluster/engine/loader.py`
lists them in its table of checkpoint layouts).

Qwen3-MoE and DeepSeek-V2 checkpoints already use the engine's names
(`mlp.gate`, `mlp.experts.E.{gate,up,down}_proj`, `mlp.shared_experts.*`, MLA's
`self_attn.kv_a_proj_with_mqa` ...). Mixtral's sparse block is `block_sparse_moe` with
experts `w1` (gate), `w3` (up), `w2` (down): a rename.
"""
from __future__ import annotations

import re
from typing import Optional

QWEN3_MOE = ("Qwen3MoeForCausalLM",)
MIXTRAL = ("MixtralForCausalLM",)
DEEPSEEK_V2 = ("DeepseekV2ForCausalLM",)

_MIXTRAL_EXPERT = re.compile(r"(.*\.)block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_MIXTRAL_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def mixtral_name_map(name: str) -> Optional[str]:
    m = _MIXTRAL_EXPERT.match(name)
    if m:
        return f"{m.group(1)}mlp.experts.{m.group(2)}.{_MIXTRAL_PROJ[m.group(3)]}.weight"
    return name.replace(".block_sparse_moe.", ".mlp.")
