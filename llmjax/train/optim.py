"""The optimizer: AdamW, warmup + decay schedule, global-norm clipping, weight decay on matrices."""

from __future__ import annotations

import jax
import optax

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
    """Decay weight matrices and embeddings; leave norms' scales and biases alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
