"""Rotary position embeddings (RoPE) with the Llama-family scalings.

Hugging Face layout: a head vector is split in two halves; pair ``(x[i], x[i + d/2])`` is
rotated by angle ``position * inv_freq[i]``.  Angles are computed in float32 from each row's
own positions (never the batch's widest row), then cos/sin are cast to the activations' dtype.
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """inv_freq ``[head_dim / 2]`` (float32) for rope_type default, linear or llama3."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":  # positions divided by factor
        return inv_freq / factor
    if kind == "llama3":
        # Llama 3: long wavelengths (beyond the original context / low_freq_factor) are slowed
        # down by `factor`, short ones (below original / high_freq_factor) kept, the band in
        # between interpolated linearly in 1 / wavelength.
        original = float(scaling["original_max_position_embeddings"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        slow = inv_freq / factor
        blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: slow, 1: keep
        mixed = (1 - blend) * inv_freq / factor + blend * inv_freq
        out = torch.where(wavelength > original / low, slow, mixed)
        return torch.where(wavelength < original / high, inv_freq, out)
    raise ValueError(f"unsupported rope_type {kind!r}")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin ``[R, W, head_dim]`` for positions ``[R, W]`` (angles in float32).

    The signed sin is ``(-sin, sin)`` over the two halves, so that rotating is
    ``x * cos + roll(x, half) * signed_sin`` (the same products as ``rotate_half``, exactly).
    """
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [R, W, head_dim/2]
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [R, W, heads, head_dim]`` by cos / signed sin ``[R, W, 1, head_dim]``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)
