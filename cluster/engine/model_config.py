"""ModelConfig: the shape of a decoder (Llama family, plus sparse-MoE feed-forward blocks and
DeepSeek's multi-head latent attention), from an HF config.json, GGUF metadata or a preset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class MoeConfig:
    """Sparse feed-forward blocks: each token runs `top_k` of `num_experts` expert MLPs (see moe.py)."""
    num_experts: int
    top_k: int
    intermediate_size: int            # of one expert
    sparse_layers: tuple              # layer indices with a sparse block; the others keep the dense MLP
    norm_topk_prob: bool = False      # renormalise the chosen experts' weights to sum to 1
    num_shared_experts: int = 0       # DeepSeek: a dense MLP this many experts wide beside the routed ones
    topk_method: str = "greedy"       # greedy | group_limited_greedy (DeepSeek: top groups, then experts)
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        assert 0 < self.top_k <= self.num_experts, "top_k must be in [1, num_experts]"
        assert self.topk_method in ("greedy", "group_limited_greedy"), f"topk_method {self.topk_method!r}"
        assert self.num_experts % self.num_groups == 0, "num_experts must be a multiple of n_group"


@dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2): K/V come from one low-rank latent per token (see mla.py)."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: Optional[int] = None   # None: q comes from one full projection (V2-Lite)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = field(default=None, hash=False, compare=False)  # Llama-3 or YaRN
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False      # Qwen2: q/k/v projections carry a bias
    qk_norm: bool = False             # Qwen3: RMSNorm over head_dim on q and k before RoPE
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    architecture: str = "LlamaForCausalLM"
    moe: Optional[MoeConfig] = None
    mla: Optional[MlaConfig] = None

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(planes, heads, dim) of one token's cache entry per layer: K and V per KV head, or with MLA
        one plane holding the compressed latent and the rope key side by side (all heads share it)."""
        if self.mla is not None:
            return 1, 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2, self.num_kv_heads, self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = cfg["num_attention_heads"]
        # transformers 5 folds rope_theta / rope_scaling into rope_parameters
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "yarn"):
            raise ValueError(f"unsupported rope scaling {rope_type!r}")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope_type != "default" else None
        if scaling is not None:
            scaling["rope_type"] = rope_type
            if rope_type == "yarn" and scaling.get("factor") is None:   # DeepSeek-V3 style: implied by the lengths
                scaling["factor"] = cfg["max_position_embeddings"] / scaling["original_max_position_embeddings"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        is_qwen2 = arch.startswith("Qwen2")
        mla = _mla_config(cfg)
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=mla.qk_rope_head_dim if mla else cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", is_qwen2), qk_norm=arch.startswith("Qwen3"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, architecture=arch,
            moe=_moe_config(cfg), mla=mla)


def _moe_config(cfg: dict) -> Optional[MoeConfig]:
    """Qwen3-MoE (`decoder_sparse_step`, `mlp_only_layers`), Mixtral (every layer, always renormalised),
    DeepSeek-V2 (`first_k_dense_replace` dense layers, shared experts, scaled and group-limited routing)."""
    num = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    if not num:
        return None
    layers, arch = range(cfg["num_hidden_layers"]), (cfg.get("architectures") or [""])[0]
    if arch.startswith("Deepseek"):
        # transformers' DeepseekV2TopkRouter scales and never renormalises, whatever norm_topk_prob says
        return MoeConfig(num, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                         tuple(i for i in layers if i >= cfg.get("first_k_dense_replace", 0)),
                         num_shared_experts=cfg.get("n_shared_experts") or 0,
                         topk_method=cfg.get("topk_method") or "greedy", num_groups=cfg.get("n_group") or 1,
                         topk_groups=cfg.get("topk_group") or 1,
                         routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)))
    if arch.startswith("Mixtral"):
        return MoeConfig(num, cfg["num_experts_per_tok"], cfg["intermediate_size"], tuple(layers), True)
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or ())
    return MoeConfig(num, cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
                     tuple(i for i in layers if i not in dense and (i + 1) % step == 0),
                     bool(cfg.get("norm_topk_prob", False)))


def _mla_config(cfg: dict) -> Optional[MlaConfig]:
    if not cfg.get("kv_lora_rank"):
        return None
    return MlaConfig(cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
                     cfg.get("q_lora_rank"))


PRESETS: dict[str, ModelConfig] = {
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
        num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    # sparse and latent-attention shapes (dummy weights: benchmarks/moe_gpu.py); V2-Lite without its yarn scaling
    "qwen3-30b-a3b": ModelConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48, num_heads=32, num_kv_heads=4,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, qk_norm=True,
        eos_token_ids=(151645,), architecture="Qwen3MoeForCausalLM",
        moe=MoeConfig(128, 8, 768, tuple(range(48)), norm_topk_prob=True)),
    "deepseek-v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27, num_heads=16, num_kv_heads=16,
        head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=163840,
        bos_token_id=100000, eos_token_ids=(100001,), architecture="DeepseekV2ForCausalLM",
        moe=MoeConfig(64, 6, 1408, tuple(range(1, 27)), num_shared_experts=2),
        mla=MlaConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)),
    # vocabulary of the default tokenizer (SmolLM2), so dummy runs can decode text
    "tiny-qwen3-moe": ModelConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, rms_norm_eps=1e-6, qk_norm=True, eos_token_ids=(2,), architecture="Qwen3MoeForCausalLM",
        moe=MoeConfig(8, 2, 32, (0, 1), norm_topk_prob=True)),
    "tiny-deepseek-v2": ModelConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=16, rms_norm_eps=1e-6, eos_token_ids=(2,), architecture="DeepseekV2ForCausalLM",
        moe=MoeConfig(8, 2, 32, (1,), num_shared_experts=1),   # latent widths the Triton MLA kernel takes
        mla=MlaConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16)),
    "tiny-llama": ModelConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
}
