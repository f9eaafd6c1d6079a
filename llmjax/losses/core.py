"""The next-token losses and the ``aux`` conventions every loss of the loop follows (see
``llmjax.losses``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError
from llmjax.losses.chunked import DEFAULT_CHUNK, LogitStats, head_logit_stats, plain_logit_stats

# aux keys that add up over micro-batches; every other metric is a mean weighted by ``tokens``.
SUMMED = ("tokens", "num_tokens")


def masked_cross_entropy(logits_BTV, targets_BT, mask_BT, z_loss: float = 0.0, accuracy=False):
    """Mean next-token cross entropy over ``mask_BT`` tokens, plus ``z_loss * mean(log Z ** 2)``.

    Computed in float32 whatever the logits' dtype: the log-sum-exp of a bfloat16 vocabulary
    row loses the digits the loss is made of. ``accuracy`` adds ``mean_token_accuracy``: the
    fraction of scored tokens whose target is the arg-max (TRL's name). Targets the mask leaves
    out may hold anything, -100 included.
    """
    logits = logits_BTV.astype(jnp.float32)
    # Only what the mask multiplies by 0 changes: an out-of-range id there would gather NaN.
    targets_BT = jnp.where(mask_BT.astype(bool), targets_BT, 0)
    log_z_BT = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    hit_BT = (jnp.argmax(logits, axis=-1) == targets_BT) if accuracy else None
    return _cross_entropy(LogitStats(target_logit_BT, log_z_BT, hit_BT), mask_BT, z_loss)


def cross_entropy_of_stats(stats: LogitStats, mask_BT, z_loss: float = 0.0, accuracy=False):
    """``masked_cross_entropy`` from per-token ``LogitStats`` (``chunked_logit_stats``)."""
    return _cross_entropy(stats if accuracy else stats._replace(hit=None), mask_BT, z_loss)


def _cross_entropy(stats: LogitStats, mask_BT, z_loss: float):
    nll_BT = stats.log_z - stats.target
    mask = mask_BT.astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    nll = (nll_BT * mask).sum() / count
    loss = nll
    metrics = {"nll": nll, "tokens": mask.sum()}
    if z_loss:
        zl = (jnp.square(stats.log_z) * mask).sum() / count
        loss = loss + z_loss * zl
        metrics["z_loss"] = zl
    if stats.hit is not None:
        metrics["mean_token_accuracy"] = (stats.hit * mask).sum() / count
    return loss, metrics


def real_tokens(batch) -> jax.Array:
    """Input tokens that are not padding (segment id 0 marks padding when segments are given)."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).sum().astype(jnp.float32)
    return jnp.float32(batch["tokens"].size)


def next_token_loss(
    model, z_loss: float = 0.0, accuracy: bool = False, chunk: int | None = DEFAULT_CHUNK
):
    """Next-token cross entropy for ``model`` over a packed or padded batch.

    The batch holds ``tokens``, ``targets``, ``positions``, ``segment_ids`` and ``loss_mask``
    (see ``llmjax.data.packing``); pretraining scores every target of a document, fine-tuning only
    the completion's (its data sets ``loss_mask``). Takes the model's parameters as ``params``;
    ``frozen`` is unused.

    ``chunk`` tokens per device are projected to the vocabulary at a time
    (``llmjax.losses.chunked``), so float32 ``[B, T, V]`` logits never exist; the loss, its
    gradients and the metrics equal the plain path's, which ``chunk=0`` (or None) takes.

    A mixture-of-experts model adds ``router_aux_coef * balance + router_z_coef * z`` with the
    coefficients of its config (the losses over every real input token, see
    ``llmjax.layers.moe.aux_losses``), reported as ``moe/balance_loss`` and ``moe/router_z_loss``.
    """
    cfg = model.config
    _check_chunk(chunk)

    def loss_fn(params, frozen, batch, rng):
        del frozen, rng  # no dropout in the model zoo's decoders
        inputs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
        targets, mask = batch["targets"], batch["loss_mask"]
        if chunk:
            stats, moe_aux = target_stats(
                model, params, batch["tokens"], targets, mask, chunk=chunk, routed=True, **inputs
            )
            loss, aux = cross_entropy_of_stats(stats, mask, z_loss, accuracy)
        else:
            logits, moe_aux = apply_routed(model, params, batch["tokens"], **inputs)
            loss, aux = masked_cross_entropy(logits, targets, mask, z_loss, accuracy)
        loss, aux = add_router_loss(cfg, moe_aux, loss, aux)
        return loss, {**aux, "num_tokens": real_tokens(batch)}

    return loss_fn


def target_stats(
    model,
    params,
    tokens,
    targets_BT,
    mask_BT=None,
    *,
    temperature: float = 1.0,
    chunk: int | None = DEFAULT_CHUNK,
    routed: bool = False,
    **inputs,
):
    """``(LogitStats, moe_aux)`` of ``model``'s logits over ``tokens`` at ``targets_BT``.

    ``inputs`` go to ``model.apply`` (positions, segment ids, attention mask). With ``chunk``
    the statistics come from the hidden states, ``chunk`` tokens per device at a time
    (``llmjax.losses.chunked.head_logit_stats``); with ``chunk=0`` or None from the full logits
    (``plain_logit_stats``). ``temperature`` divides the logits (a sampler's). ``mask_BT`` marks
    the tokens read: the others may hold any target. ``routed=True`` runs ``apply_routed``,
    whose router losses come back as ``moe_aux`` (None otherwise, and for a dense model).
    """
    _check_chunk(chunk)
    run = apply_routed if routed else _apply_plain
    if chunk:
        hidden, moe_aux = run(model, params, tokens, return_hidden=True, **inputs)
        stats = head_logit_stats(
            model.config,
            params,
            hidden,
            targets_BT,
            mask_BT,
            temperature=temperature,
            chunk=chunk,
        )
        return stats, moe_aux
    logits, moe_aux = run(model, params, tokens, **inputs)
    return plain_logit_stats(logits, targets_BT, mask_BT, temperature=temperature), moe_aux


def target_logprobs(
    model,
    params,
    tokens,
    targets_BT,
    mask_BT=None,
    *,
    temperature: float = 1.0,
    chunk: int | None = DEFAULT_CHUNK,
    return_aux: bool = False,
    **inputs,
):
    """float32 ``[B, T]``: ``log softmax(logits / temperature)[target]`` of ``model`` at each
    token, 0 where ``mask_BT`` (optional, bool or float) is unset; see ``target_stats``.

    ``(target_logprobs(...) * mask).sum(-1)`` is ``sequence_logprobs(logits, targets, mask)``
    without the logits. ``return_aux=True`` returns ``(logprobs, moe_aux)`` with a
    mixture-of-experts model's router losses (``apply_routed``; None for a dense model).
    """
    stats, moe_aux = target_stats(
        model,
        params,
        tokens,
        targets_BT,
        mask_BT,
        temperature=temperature,
        chunk=chunk,
        routed=return_aux,
        **inputs,
    )
    logp = stats.logp
    if mask_BT is not None:
        logp = jnp.where(mask_BT.astype(bool), logp, 0.0)
    return (logp, moe_aux) if return_aux else logp


def _apply_plain(model, params, tokens, **kwargs):
    return model.apply(params, tokens, **kwargs), None


def _check_chunk(chunk) -> None:
    if chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0):
        return
    raise ConfigError(
        f"chunk={chunk!r} must be a non-negative int: tokens per device projected to the "
        "vocabulary at a time, 0 or None for the full logits"
    )


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
