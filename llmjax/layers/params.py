"""Parameter constructors: every parameter carries its logical axis names as ``axes`` metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import ModelConfig, dtype_of


def dense(cfg: ModelConfig, rngs: nnx.Rngs, shape, names, *, depth_scaled=False):
    """A weight drawn from a truncated normal with std ``init_std`` (GPT-2 style).

    Output projections (``depth_scaled``) shrink by sqrt(2 * n_layers) so that the residual stream's
    variance does not grow with depth.
    """
    std = cfg.init_std / ((2 * cfg.n_layers) ** 0.5 if depth_scaled else 1.0)
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    return nnx.Param(value.astype(dtype_of(cfg.param_dtype)), axes=tuple(names))


def zeros(cfg: ModelConfig, shape, names):
    return nnx.Param(jnp.zeros(shape, dtype_of(cfg.param_dtype)), axes=tuple(names))
