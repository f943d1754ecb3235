"""Rotary position embeddings (Su et al.), with Llama-3's frequency-dependent scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), rescaled as the checkpoint's `rope_scaling` says. Float32, [head_dim/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":  # position interpolation: every frequency slowed by the same factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1 paper / reference code: long wavelengths are divided by `factor`, short ones kept,
        # and the band between is interpolated smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling {kind!r}")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) for given positions; applied to q and k with `apply_rope`."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta, scaling), persistent=False)

    def materialize(self, device: torch.device | str) -> None:
        """Recompute the buffer on `device` (the model is built on the meta device)."""
        self.inv_freq = rope_inverse_frequencies(self.head_dim, self.theta, self.scaling).to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [B, T] int. Returns cos, sin: [..., T, head_dim] in `dtype`."""
        # Angles in float32 even for bf16 models: position * frequency loses digits fast in bf16.
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, sin: [T, D] or [B, T, D]. HF's half-split layout (not interleaved pairs)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return x * cos + rotate_half(x) * sin
