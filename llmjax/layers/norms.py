"""RMSNorm and LayerNorm, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of


class Norm(nnx.Module):
    """RMSNorm (optionally with Gemma's ``1 + w`` scale) or LayerNorm over the last axis."""

    def __init__(self, cfg: ModelConfig, dim: int, *, axis_name: str = axes.NORM):
        pdt = dtype_of(cfg.param_dtype)
        self.kind, self.eps, self.unit_offset = cfg.norm, cfg.norm_eps, cfg.norm_unit_offset
        # With a unit offset the identity scale is w = 0, otherwise w = 1.
        init = jnp.zeros if self.unit_offset else jnp.ones
        self.scale = nnx.Param(init((dim,), pdt), axes=(axis_name,))
        if self.kind == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), pdt), axes=(axis_name,))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
        scale = self.scale[...].astype(jnp.float32)
        x = x * (1.0 + scale if self.unit_offset else scale)
        if self.kind == "layernorm":
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(dtype)
