"""Losses shared by recipes. Each returns ``(scalar loss, dict of scalar metrics)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0):
    """Mean next-token cross entropy over ``mask_BT`` tokens, plus ``z_loss * mean(log Z ** 2)``.

    Computed in float32 whatever the logits' dtype: the log-sum-exp of a bfloat16 vocabulary
    row loses the digits the loss is made of.
    """
    logits = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = log_z_BT - target_logit_BT
    mask = mask_BT.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    nll = (nll_BT * mask).sum() / count
    loss = nll
    metrics = {"nll": nll, "tokens": mask.sum()}
    if z_loss:
        zl = (jnp.square(log_z_BT) * mask).sum() / count
        loss = loss + z_loss * zl
        metrics["z_loss"] = zl
    return loss, metrics


def next_token_loss(model, z_loss: float = 0.0):
    """The pretraining loss for ``model`` over a packed batch (see ``llmjax.data.packing``)."""

    def loss_fn(params, batch, rng):
        del rng  # no dropout in the model zoo's decoders
        logits = model.apply(
            params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        return masked_cross_entropy(logits, batch["targets"], batch["loss_mask"], z_loss)

    return loss_fn
