"""The next-token losses and the ``aux`` conventions every loss of the loop follows (see
``llmjax.losses``)."""

from __future__ import annotations

import math

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

    A mixture-of-experts model adds ``router_aux_coef * balance + router_z_coef * z`` with the
    coefficients of its config (the losses over every real input token, see
    ``llmjax.layers.moe.aux_losses``), reported as ``moe/balance_loss`` and ``moe/router_z_loss``.
    """
    cfg = model.config

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # no dropout in the model zoo's decoders
        logits, moe_aux = apply_routed(
            model,
            params,
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        loss, aux = masked_cross_entropy(
            logits, batch["targets"], batch["loss_mask"], z_loss, accuracy
        )
        loss, aux = add_router_loss(cfg, moe_aux, loss, aux)
        return loss, {**aux, "num_tokens": real_tokens(batch)}

    return loss_fn


def apply_routed(model, params, tokens, **kwargs):
    """``(out, moe_aux)``: ``model.apply(params, tokens, **kwargs)`` and, for a mixture-of-experts
    model, its ``balance_loss`` and ``router_z_loss`` (``return_aux=True``); ``moe_aux`` is None
    for a dense model, whose forward is the plain one."""
    if model.config.n_experts > 0:
        return model.apply(params, tokens, return_aux=True, **kwargs)
    return model.apply(params, tokens, **kwargs), None


def router_loss(cfg, moe_aux) -> tuple[jax.Array, dict]:
    """``(router_aux_coef * balance + router_z_coef * z, metrics)`` of a mixture-of-experts
    forward's aux (``model.apply(..., return_aux=True)``), with the coefficients of the model
    config ``cfg``. The metrics ``moe/balance_loss`` and ``moe/router_z_loss`` are means over the
    real input tokens, so micro-batches average them as every metric not in ``SUMMED``."""
    balance, router_z = moe_aux["balance_loss"], moe_aux["router_z_loss"]
    extra = cfg.router_aux_coef * balance + cfg.router_z_coef * router_z
    return extra, {"moe/balance_loss": balance, "moe/router_z_loss": router_z}


def add_router_loss(cfg, moe_aux, loss, aux: dict):
    """``(loss + router_loss, aux + its metrics)``; ``loss`` and ``aux`` as they are when
    ``moe_aux`` holds no router losses (None from ``apply_routed``, or a dense model's empty aux),
    so a dense model's loss is the same to the bit."""
    if not moe_aux:
        return loss, aux
    extra, metrics = router_loss(cfg, moe_aux)
    return loss + extra, {**aux, **metrics}


def sequence_logprobs(logits_BTV, targets_BT, mask_BT) -> jax.Array:
    """``[B]`` float32: per row, ``sum_t mask[t] * log softmax(logits[t])[targets[t]]``.

    Computed in float32 whatever the logits' dtype; ``mask_BT`` is bool or float (a weight).
    Positions the mask leaves out may hold anything, targets such as -100 included.
    """
    keep_BT = mask_BT.astype(bool)
    logits_BTV = _where_kept(logits_BTV, keep_BT)
    targets_BT = jnp.where(keep_BT, targets_BT, 0)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    logp_BT = target_logit_BT - jax.nn.logsumexp(logits_BTV, axis=-1)
    return jnp.where(keep_BT, logp_BT * mask_BT.astype(jnp.float32), 0.0).sum(-1)


def _where_kept(logits_BTX, keep_BT):
    # Zeroing the rows the mask leaves out before the softmax, not only their result after it,
    # keeps NaN and inf there out of the backward pass as well: the zero cotangent a ``where``
    # sends them would still be multiplied by their NaN local derivatives.
    return jnp.where(keep_BT[..., None], logits_BTX.astype(jnp.float32), 0.0)


def _log1mexp(x):
    # log(1 - exp(x)) for x < 0, each branch where it keeps its digits (Maechler 2012); both stay
    # finite for x <= ORPO_MAX_LOGP, so the branch ``where`` drops sends no NaN into the gradient.
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
