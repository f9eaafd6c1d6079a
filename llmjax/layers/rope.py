"""Rotary position embeddings with linear, Llama 3 and YaRN scaling (half-split channel layout)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llmjax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Per-channel-pair inverse frequencies and the factor applied to cos/sin (YaRN's mscale)."""
    dim = int(head_dim * rope.fraction)
    inv = 1.0 / rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope.kind == "linear":
        return inv / rope.factor, 1.0
    if rope.kind == "llama3":
        old = rope.original_max_len
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if rope.kind == "yarn":
        return _yarn(rope, dim, inv)
    return inv, 1.0


def _yarn(rope: RopeConfig, dim: int, inv_extra: np.ndarray) -> tuple[np.ndarray, float]:
    factor, base, old = rope.factor, rope.theta, rope.original_max_len
    attention_factor = rope.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def correction_dim(rotations):
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    inv = (inv_extra / factor) * (1 - extrapolate) + inv_extra * extrapolate
    return inv, attention_factor


def rope_tables(rope: RopeConfig, head_dim: int, positions_BT):
    """cos and sin of shape [B, T, C_rot / 2] in float32."""
    inv, mscale = inverse_frequencies(rope, head_dim)
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def apply_rope(x_BTHC, cos, sin):
    """Rotate the first 2 * cos.shape[-1] channels of every head; the rest pass through."""
    half = cos.shape[-1]
    dtype = x_BTHC.dtype
    x = x_BTHC.astype(jnp.float32)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(dtype)
