"""Tiny random-weight checkpoints of the MoE / MLA families, made with transformers (no network).

Routers are scaled up so expert choices are decisive (a near tie would let float noise pick
another expert), and norms perturbed so they matter. Shared by the engine reference tests and
the served prefill/decode tests.
"""
from __future__ import annotations

import torch

DEFAULT_VOCAB = 49152   # the default tokenizer's: served tests decode real text
COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
              rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v2_yarn")
# DeepSeek-V2-Lite's kind of rope scaling; mscale != mscale_all_dim so both YaRN scales matter
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 32, "beta_slow": 1}


def tiny_config(family: str, vocab_size: int = 256):
    import transformers
    if family == "qwen3_moe":   # layer 0 dense (mlp_only_layers), layer 1 sparse, renormalised top-2 of 4
        return transformers.Qwen3MoeConfig(**COMMON, vocab_size=vocab_size, intermediate_size=48,
                                           moe_intermediate_size=16, num_key_value_heads=2, head_dim=8,
                                           num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                           mlp_only_layers=[0])
    if family == "mixtral":
        return transformers.MixtralConfig(**COMMON, vocab_size=vocab_size, intermediate_size=16,
                                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    if family.startswith("deepseek_v2"):   # layer 0 dense, layer 1: 2 shared + top-2 of 4 routed, group-limited
        rope = {"rope_parameters": YARN} if family.endswith("yarn") else {}
        return transformers.DeepseekV2Config(
            **COMMON, **rope, vocab_size=vocab_size, intermediate_size=48, moe_intermediate_size=16,
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2, topk_group=1,
            routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=12)
    raise ValueError(family)


def save_tiny(path, family: str, vocab_size: int = 256, seed: int = 0):
    """-> the transformers model (float32, eval) whose checkpoint is now in `path`."""
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_config(family, vocab_size)
    cls = {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM,
           "deepseek_v2": transformers.DeepseekV2ForCausalLM}[family.removesuffix("_yarn")]
    model = cls(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):   # the routers
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    return model.eval()
