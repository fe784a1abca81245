"""DllmModelSpec: how a model is driven by the block loop, told apart by its config.json.

| kind   | logits  | attention in the block          | mask token                          |
|--------|---------|---------------------------------|-------------------------------------|
| causal | shifted | causal (bidirectional_lens 0)   | a placeholder (`mask_token_id`)     |
| llada  | direct  | bidirectional block, KV prefix  | 126336 / config.json `mask_token_id`|
| sdar   | direct  | bidirectional block (aligned)   | config.json / tokenizer `<|MASK|>`  |

Shifted (as Dream does): position i is predicted by the logits at i - 1, so a round must
re-run the last committed token. A causal model never saw a mask token: the placeholder is
an ordinary input (it may also come out: with block size 1 the loop is autoregressive
greedy decoding, token for token). A real mask token never comes out.

SDAR is trained with blocks aligned to multiples of the block size from position 0, so the
prompt's tail and the first answer positions share a block (as in SDAR's generate.py), and
committed blocks attend both ways inside themselves (the engine's
`ForwardInput.attn_block_sizes`, see round_manager.py).
LLaDA was trained fully bidirectional: a cached causal prefix with a bidirectional block is
the usual approximation (Fast-dLLM's prefix cache) that lets its KV be reused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from cluster.engine import llada_layout, sdar_layout

LLADA_MASK_TOKEN_ID = 126336
SDAR_MASK_TOKEN = "<|MASK|>"


@dataclass(frozen=True, slots=True)
class DllmModelSpec:
    kind: str                   # causal | llada | sdar
    mask_token_id: int
    shifted: bool               # logits at i - 1 predict position i
    block_attention: bool       # the block attends to itself both ways
    aligned_blocks: bool        # blocks start at multiples of the block size

    @property
    def shift(self) -> int:
        return 1 if self.shifted else 0

    @property
    def bans_mask(self) -> bool:
        """A real mask token (not a causal model's placeholder) never comes out."""
        return self.kind != "causal"

    @classmethod
    def causal(cls, placeholder: int = 0) -> "DllmModelSpec":
        return cls("causal", placeholder, shifted=True, block_attention=False, aligned_blocks=False)

    @classmethod
    def llada(cls, mask_token_id: int = LLADA_MASK_TOKEN_ID) -> "DllmModelSpec":
        return cls("llada", mask_token_id, shifted=False, block_attention=True, aligned_blocks=False)

    @classmethod
    def sdar(cls, mask_token_id: int) -> "DllmModelSpec":
        return cls("sdar", mask_token_id, shifted=False, block_attention=True, aligned_blocks=True)


def read_hf_config(path: str) -> Optional[dict]:
    cfg = os.path.join(path, "config.json") if path and os.path.isdir(path) else ""
    if not cfg or not os.path.exists(cfg):
        return None
    with open(cfg) as f:
        return json.load(f)


def detect_spec(path: str, tokenizer=None, eos_token_ids=(), mask_token_id: Optional[int] = None) -> DllmModelSpec:
    """The spec of the weights at `path` (HF directory; a GGUF file or preset is causal).
    `mask_token_id` (the group's setting) overrides the model's mask / placeholder."""
    hf = read_hf_config(path) or {}
    arch = (hf.get("architectures") or [""])[0]
    if arch in llada_layout.ARCHITECTURES or hf.get("model_type") == "llada":
        return DllmModelSpec.llada(_first(mask_token_id, hf.get("mask_token_id"), LLADA_MASK_TOKEN_ID))
    if arch in sdar_layout.ARCHITECTURES or hf.get("model_type") == "sdar":
        from_tok = tokenizer.backend.token_to_id(SDAR_MASK_TOKEN) if tokenizer is not None else None
        mask = _first(mask_token_id, hf.get("mask_token_id"), from_tok)
        if mask is None:
            raise ValueError(f"{path}: SDAR model without a mask token; set mask_token_id in the [[dllm]] group")
        return DllmModelSpec.sdar(mask)
    eos = sorted(eos_token_ids)
    return DllmModelSpec.causal(_first(mask_token_id, hf.get("pad_token_id"), eos[0] if eos else None, 0))


def _first(*values):
    return next((v for v in values if v is not None), None)
