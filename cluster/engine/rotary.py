"""Rotary position embedding (HF rotate-half layout; DeepSeek's interleaved pairs), with Llama-3 and
YaRN frequency scaling, as transformers computes them."""
from __future__ import annotations

import math
from typing import Optional

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    if scaling.get("rope_type") == "yarn":
        return _yarn_frequencies(head_dim, theta, scaling)
    # Llama 3: keep high frequencies, divide low ones by `factor`, blend in between
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_frequencies(dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN: low frequencies interpolated by `factor`, high ones kept, a linear ramp between the
    dimensions that turn `beta_fast` and `beta_slow` times over the original context."""
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high + 0.001 if low == high else high) - low))
    keep = 1 - ramp.clamp(0, 1)   # share of the original (extrapolated) frequency
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: Optional[dict]) -> float:
    """YaRN's scale on cos/sin (1 otherwise)."""
    if not scaling or scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor, mscale, all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, all_dim) if mscale and all_dim else _yarn_mscale(factor)


def softmax_mscale(scaling: Optional[dict]) -> float:
    """DeepSeek's extra YaRN factor on the whole q.k softmax scale (transformers' yarn_apply_mscale)."""
    if not scaling or scaling.get("rope_type") != "yarn" or not scaling.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position, looked up per token (no per-forward trig)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        # same float32 product as transformers, so tables match it bit for bit
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = attention_factor(scaling)
        signed_sin = emb.sin() * scale
        signed_sin[:, :head_dim // 2].neg_()   # rotate_half's sign folded into the table (exact)
        self.register_buffer("cos", emb.cos() * scale, persistent=False)
        self.register_buffer("signed_sin", signed_sin, persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin `[T, 1, D]` for the tokens of one forward (looked up once, used by every layer)."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] (q and k heads together where they sit side by side) -> rotated copy.

    HF's `x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`: the sign lives
    in `sin` (see RotaryEmbedding), so this is the same arithmetic in 4 kernels instead of 5.
    """
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation over adjacent pairs (x[2i], x[2i+1]) instead of halves: DeepSeek-V2's rope
    (transformers multiplies the pairs as complex numbers). Takes RotaryEmbedding's tables as is."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., half:]   # the second half of the signed table is +sin
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
