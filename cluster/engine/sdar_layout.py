"""SDAR checkpoints (`SDARForCausalLM`): Qwen3's layout and tensor names (q/k RMSNorm), so
only the architecture is renamed for the engine's config reader. `cluster/engine/loader.py`
lists this layout in its table of checkpoint layouts."""
from __future__ import annotations

from typing import Optional

ARCHITECTURES = ("SDARForCausalLM",)


def sdar_name_map(name: str) -> Optional[str]:
    return name


def sdar_config_map(cfg: dict) -> dict:
    return {**cfg, "architectures": ["Qwen3ForCausalLM"]}

