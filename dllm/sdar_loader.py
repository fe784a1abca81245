"""SDAR checkpoints (`SDARForCausalLM`): Qwen3's layout and tensor names (q/k RMSNorm), so
only the architecture is renamed for the engine's config reader. Importing this module
registers the layout with the engine's loader."""
from __future__ import annotations

from typing import Optional

from cluster.engine.loader import register_layout

ARCHITECTURES = ("SDARForCausalLM",)


def sdar_name_map(name: str) -> Optional[str]:
    return name


def sdar_config_map(cfg: dict) -> dict:
    return {**cfg, "architectures": ["Qwen3ForCausalLM"]}


for _arch in ARCHITECTURES:
    register_layout(_arch, sdar_name_map, sdar_config_map)
