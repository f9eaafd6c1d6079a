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


def project(eq: str, x, param, dtype):
    """``einsum(eq, x, W)`` for a weight parameter ``param`` in compute ``dtype``.

    A weight may hold more than an array: a quantized weight or a LoRA-adapted one
    (``llmjax.lora.LoraWeight``) computes its own product (dequantizing inside the layer, adding
    ``x . a . b`` without forming ``W + a . b``).
    """
    w = param.get_value()
    if hasattr(w, "project"):
        return w.project(eq, x, dtype)
    return jnp.einsum(eq, x, w.astype(dtype))


def flat_einsum(eq: str, x, w, n_in: int):
    """``einsum(eq, x, w)`` with the weight's ``n_in`` leading (input) dims flattened into one.

    The attention output projection contracts ``(H, C)``; as one ``[H*C, D]`` matmul XLA:CPU
    keeps a layout that needs no transpose of the weight, and every form of that projection
    (plain, quantized, LoRA) then sums in the same order.
    """
    lhs, out = eq.split("->")
    x_spec, w_spec = lhs.split(",")
    ins = w_spec[:n_in]
    if n_in == 1 or not x_spec.endswith(ins):
        return jnp.einsum(eq, x, w)
    rows = x_spec[: -len(ins)]
    x2 = x.reshape(*x.shape[: len(rows)], -1)
    w2 = w.reshape(-1, *w.shape[n_in:])
    return jnp.einsum(f"{rows}X,X{w_spec[n_in:]}->{out}", x2, w2)
