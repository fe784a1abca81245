"""Rotary position embedding (HF rotate-half layout), with Llama-3 frequency scaling."""
from __future__ import annotations

import math
from typing import Optional

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: Optional[dict]) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
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


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position, looked up per token (no per-forward trig)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        # same float32 product as transformers, so tables match it bit for bit
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        signed_sin = emb.sin()
        signed_sin[:, :head_dim // 2].neg_()   # rotate_half's sign folded into the table (exact)
        self.register_buffer("cos", emb.cos(), persistent=False)
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
