"""Losses as pure functions, usable with or without the training loop.

A loss for the loop has the signature ``loss(params, frozen, batch, rng) -> (loss, aux)``:
``params`` are the trainable parameters, ``frozen`` a dict of frozen pytrees (a reference model,
a teacher, a quantized base; empty for pretraining), ``batch`` a dict of ``[B, ...]`` arrays.
``aux`` is a dict of scalars with two reserved keys:

- ``tokens``: how many tokens (or examples) ``loss`` and every other metric average over. Gradient
  accumulation weights each micro-batch by it, so accumulated steps equal one step on the whole
  batch.
- ``num_tokens``: real (non-padding) input tokens processed; the loop's tokens/s and TRL's
  ``num_tokens`` count these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# aux keys that add up over micro-batches; every other metric is a mean weighted by ``tokens``.
SUMMED = ("tokens", "num_tokens")


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0, accuracy=False):
    """Mean next-token cross entropy over ``mask_BT`` tokens, plus ``z_loss * mean(log Z ** 2)``.

    Computed in float32 whatever the logits' dtype: the log-sum-exp of a bfloat16 vocabulary
    row loses the digits the loss is made of. ``accuracy`` adds ``mean_token_accuracy``: the
    fraction of scored tokens whose target is the arg-max (TRL's name).
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
    if accuracy:
        hit_BT = jnp.argmax(logits, axis=-1) == targets_BT
        metrics["mean_token_accuracy"] = (hit_BT * mask).sum() / count
    return loss, metrics


def real_tokens(batch) -> jax.Array:
    """Input tokens that are not padding (segment id 0 marks padding when segments are given)."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).sum().astype(jnp.float32)
    return jnp.float32(batch["tokens"].size)


def next_token_loss(model, z_loss: float = 0.0, accuracy: bool = False):
    """Next-token cross entropy for ``model`` over a packed or padded batch.

    The batch holds ``tokens``, ``targets``, ``positions``, ``segment_ids`` and ``loss_mask``
    (see ``llmjax.data.packing``); pretraining scores every target of a document, fine-tuning only
    the completion's (its data sets ``loss_mask``). Takes the model's parameters as ``params``;
    ``frozen`` is unused.
    """

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # no dropout in the model zoo's decoders
        logits = model.apply(
            params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        loss, aux = masked_cross_entropy(
            logits, batch["targets"], batch["loss_mask"], z_loss, accuracy
        )
        return loss, {**aux, "num_tokens": real_tokens(batch)}

    return loss_fn
