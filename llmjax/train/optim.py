"""The optimizer: AdamW, warmup + decay schedule, global-norm clipping, weight decay on matrices.

A mixture-of-experts model with ``router_bias_update`` (DeepSeek-V3's auxiliary-loss-free
balancing) has a selection bias per expert in each MoE layer, whose gradient is the step's load
per expert minus the mean load (``llmjax.layers.moe.route``). Those leaves take their own update,
``-router_bias_update * sign(gradient)``: no AdamW, no weight decay, no learning-rate schedule,
and they are left out of the norm that clips every other gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llmjax.config import ModelConfig
from llmjax.errors import ConfigError
from llmjax.layers.moe import SELECTION_BIAS
from llmjax.models.scan import is_stacked
from llmjax.train.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    # Warmup starts at lr / warmup, not 0: a zero first step is a wasted batch.
    ramp = optax.linear_schedule(cfg.lr / warmup, cfg.lr, warmup - 1) if warmup > 1 else None
    ramp = ramp or optax.constant_schedule(cfg.lr)
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params):
    """Decay weight matrices and embeddings; leave norms' scales and biases alone.

    A scanned model's ``blocks`` stack each layer's parameter along a leading axis, which does not
    count (``llmjax.models.scan``).
    """

    def matrix(path, p):
        return p.ndim - is_stacked(path) >= 2

    return jax.tree_util.tree_map_with_path(matrix, params)


def is_selection_bias(path) -> bool:
    """Whether a leaf's key path (``jax.tree_util``) ends at an MoE layer's selection bias."""
    return bool(path) and getattr(path[-1], "key", None) == SELECTION_BIAS


def _without_selection_bias(grads):
    return jax.tree_util.tree_map_with_path(
        lambda path, g: jnp.zeros_like(g) if is_selection_bias(path) else g, grads
    )


def gradient_norm(grads) -> jax.Array:
    """The global norm of ``grads`` without the selection biases' pseudo-gradients (load counts,
    not derivatives of the loss): the norm that clipping compares with ``clip_norm``."""
    return optax.tree.norm(_without_selection_bias(grads))


def _with_selection_bias(tx, gamma: float) -> optax.GradientTransformation:
    # The other parameters' transformation sees zeros for the biases, so they add nothing to
    # the clipping norm, and the biases' own updates replace what it gives them. Its state keeps
    # the parameters' tree (the biases' moments stay zero), which checkpoints and sharding rules
    # expect, where optax.partition's masked subtrees match neither.
    def update(grads, state, params=None):
        updates, state = tx.update(_without_selection_bias(grads), state, params)
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u, g: -gamma * jnp.sign(g) if is_selection_bias(path) else u,
            updates,
            grads,
        )
        return updates, state

    return optax.GradientTransformation(tx.init, update)


def _refusing_selection_bias(tx) -> optax.GradientTransformation:
    # Built without the model's router_bias_update, AdamW would take the load counts for a
    # gradient, and their norm would clip every other parameter's: refuse instead.
    def init(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        if any(is_selection_bias(path) for path, _ in flat):
            raise ConfigError(
                f"the parameters hold MoE selection biases ({SELECTION_BIAS!r}, a model with "
                "router_bias_update > 0), but the optimizer was built without that model config: "
                "pass it, make_optimizer(optim, total_steps, model=model_config)"
            )
        return tx.init(params)

    return optax.GradientTransformation(init, tx.update)


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, model: ModelConfig | None = None
) -> optax.GradientTransformation:
    """AdamW for every parameter, except the selection biases of ``model`` when its
    ``router_bias_update`` is set (see the module docstring)."""
    tx = optax.adamw(
        lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    gamma = model.router_bias_update if model is not None else 0.0
    if gamma:
        return _with_selection_bias(tx, gamma)
    return _refusing_selection_bias(tx)
