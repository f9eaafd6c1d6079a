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

Knowledge distillation: ``distill_loss`` (forward KL, reverse KL or generalized JSD between student
and teacher logits) and ``teacher_top_k`` / ``distill_loss_top_k`` (a teacher's top-k, cacheable
offline); ``sequence_logprobs`` scores whole sequences.

Preference tuning, on ``[B]`` per-pair log-probs or rewards with TRL's metric names:
``preference_loss`` (DPO, cDPO, hinge, IPO, robust DPO), ``simpo_loss``, ``orpo_loss`` and
``reward_model_loss`` (Bradley-Terry).
"""

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


DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")
TOP_K_RESTS = ("renormalize", "bucket")  # what a top-k loss does with the teacher's other ids


def distill_loss(
    student_logits_BTV,
    teacher_logits_BTV,
    mask_BT,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    top_k_rest: str = "renormalize",
):
    """Distillation loss ``T**2 * sum_t mask[t] * d[t] / max(sum(mask), 1)`` and its metrics.

    With ``p_s = softmax(student / T)`` and ``p_t = softmax(teacher / T)`` per token, in float32:

    - ``forward_kl``: ``d = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)``;
    - ``reverse_kl``: ``d = KL(p_s || p_t)``;
    - ``jsd``: ``d = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with the mixture
      ``m = beta * p_t + (1 - beta) * p_s``, ``0 < beta < 1`` (TRL's generalized JSD).

    The ``T**2`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    ``top_k > 0`` (forward KL only) is ``distill_loss_top_k`` on ``teacher_top_k(teacher, top_k)``,
    with ``top_k_rest="bucket"`` also on ``teacher_log_normalizer`` (see there).
    Logits are ``[B, T, V]``, ``mask_BT`` bool or float; logits must be finite where the mask is
    set and may hold anything, NaN included, where it is not. Metrics: ``kl``, the mean ``d``
    without ``T**2``, and ``tokens``.
    """
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind={kind!r} is not a distillation loss; use one of {DISTILL_KINDS}")
    if kind == "jsd" and not 0 < beta < 1:
        raise ValueError(f"kind='jsd' needs beta in the open interval (0, 1), got beta={beta}")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be 0 (whole vocabulary) or a positive k")
    if top_k:
        if kind != "forward_kl":
            raise ValueError(
                f"top_k={top_k} works only with kind='forward_kl', got kind={kind!r}; "
                "set top_k=0 or kind='forward_kl'"
            )
        if top_k_rest not in TOP_K_RESTS:
            raise ValueError(f"top_k_rest={top_k_rest!r}: use one of {TOP_K_RESTS}")
        teacher_ids_BTK, teacher_logits_BTK = teacher_top_k(teacher_logits_BTV, top_k)
        logz_BT = None
        if top_k_rest == "bucket":
            logz_BT = teacher_log_normalizer(teacher_logits_BTV, temperature)
        return distill_loss_top_k(
            student_logits_BTV,
            teacher_ids_BTK,
            teacher_logits_BTK,
            mask_BT,
            temperature=temperature,
            teacher_logz_BT=logz_BT,
        )
    _check_temperature(temperature)
    keep_BT = mask_BT.astype(bool)
    logp_s_BTV = _log_probs(student_logits_BTV, keep_BT, temperature)
    logp_t_BTV = _log_probs(teacher_logits_BTV, keep_BT, temperature)
    if kind == "forward_kl":
        d_BT = _kl(logp_t_BTV, logp_s_BTV)
    elif kind == "reverse_kl":
        d_BT = _kl(logp_s_BTV, logp_t_BTV)
    else:
        # log m from the log-probabilities: mixing probabilities would round the tails to 0.
        logm_BTV = jnp.logaddexp(logp_t_BTV + math.log(beta), logp_s_BTV + math.log1p(-beta))
        d_BT = beta * _kl(logp_t_BTV, logm_BTV) + (1 - beta) * _kl(logp_s_BTV, logm_BTV)
    return _distill_mean(d_BT, mask_BT, temperature)


def teacher_top_k(teacher_logits_BTV, k: int):
    """The teacher's ``k`` largest logits per token: ``(ids_BTK int32, logits_BTK float32)``.

    The logits are raw, before any temperature, so a cache of them serves every temperature:
    ``softmax(top-k logits / T)`` is exactly the top-k of ``softmax(logits / T)`` renormalised.
    """
    V = teacher_logits_BTV.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"k={k} must lie between 1 and the vocabulary size {V}")
    logits_BTK, ids_BTK = jax.lax.top_k(teacher_logits_BTV.astype(jnp.float32), k)
    return ids_BTK.astype(jnp.int32), logits_BTK


def teacher_log_normalizer(teacher_logits_BTV, temperature: float = 1.0):
    """``[B, T]`` float32 ``logsumexp(logits / T)``: with it, top-k logits give the teacher's
    true probabilities of its k ids, and so the mass it puts on every other id."""
    _check_temperature(temperature)
    return jax.nn.logsumexp(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)


# Mass below this stays out of the rest bucket's log: 1 - sum(top-k) rounds to 0 at k = V.
_REST_FLOOR = -1e-6


def distill_loss_top_k(
    student_logits_BTV,
    teacher_ids_BTK,
    teacher_logits_BTK,
    mask_BT,
    *,
    temperature: float = 1.0,
    teacher_logz_BT=None,
):
    """Forward KL against a teacher known only by its top-k (from ``teacher_top_k``).

    Without ``teacher_logz_BT`` (renormalised): ``d = sum_k q_k (log q_k - log p_s[ids_k])`` with
    ``q = softmax(teacher_logits_BTK / T)`` renormalised over the k ids and ``p_s = softmax(student
    / T)`` over the whole vocabulary, so the student is also pushed off the ids the teacher left
    out (``d >= 0``; with ``k = V`` it is the forward KL). This asks the student for all its mass
    on the k ids, sharper than the teacher: tokens outside them become nearly impossible.

    With ``teacher_logz_BT`` (``teacher_log_normalizer`` at the same temperature; "rest bucket"):
    ``q_k`` are the teacher's true probabilities and the mass outside the k ids is one more
    outcome on both sides, ``d = sum_k q_k (log q_k - log p_k) + q_rest (log q_rest - log
    p_rest)``: the forward KL between the two distributions with the other ids merged, a lower
    bound of the full forward KL, equal to it at ``k = V``, that leaves the student its tail.

    Loss, masking and metrics as in ``distill_loss``.
    """
    _check_temperature(temperature)
    keep_BT = mask_BT.astype(bool)
    logp_s_BTV = _log_probs(student_logits_BTV, keep_BT, temperature)
    # A cache's padding rows may hold any ids; only the ones the mask keeps must be in range.
    ids_BTK = jnp.where(keep_BT[..., None], teacher_ids_BTK, 0)
    logp_s_BTK = jnp.take_along_axis(logp_s_BTV, ids_BTK, axis=-1)
    if teacher_logz_BT is None:
        logq_BTK = _log_probs(teacher_logits_BTK, keep_BT, temperature)
        return _distill_mean(_kl(logq_BTK, logp_s_BTK), mask_BT, temperature)
    logz_BT = jnp.where(keep_BT, teacher_logz_BT.astype(jnp.float32), 0.0)
    logq_BTK = _where_kept(teacher_logits_BTK, keep_BT) / temperature - logz_BT[..., None]
    logq_rest_BT = _log1mexp(jnp.minimum(jax.nn.logsumexp(logq_BTK, axis=-1), _REST_FLOOR))
    logp_rest_BT = _log1mexp(jnp.minimum(jax.nn.logsumexp(logp_s_BTK, axis=-1), _REST_FLOOR))
    rest_BT = jnp.exp(logq_rest_BT) * (logq_rest_BT - logp_rest_BT)
    return _distill_mean(_kl(logq_BTK, logp_s_BTK) + rest_BT, mask_BT, temperature)


# The helpers below take ``[B, T, X]`` arrays, X the vocabulary V or a top-k K.


def _check_temperature(temperature):
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be positive")


def _where_kept(logits_BTX, keep_BT):
    # Zeroing the rows the mask leaves out before the softmax, not only their result after it,
    # keeps NaN and inf there out of the backward pass as well: the zero cotangent a ``where``
    # sends them would still be multiplied by their NaN local derivatives.
    return jnp.where(keep_BT[..., None], logits_BTX.astype(jnp.float32), 0.0)


def _log_probs(logits_BTX, keep_BT, temperature):
    return jax.nn.log_softmax(_where_kept(logits_BTX, keep_BT) / temperature, axis=-1)


def _kl(logp_BTX, logq_BTX):
    # p = exp(log p) underflows to an exact 0 rather than pairing 0 with log 0 = -inf.
    return (jnp.exp(logp_BTX) * (logp_BTX - logq_BTX)).sum(-1)


def _distill_mean(d_BT, mask_BT, temperature):
    mask = mask_BT.astype(jnp.float32)
    kl = jnp.where(mask_BT.astype(bool), d_BT * mask, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)
    return temperature**2 * kl, {"kl": kl, "tokens": mask.sum()}


PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "robust")


def preference_loss(
    chosen_logps,
    rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
):
    """DPO and its variants: ``(mean_b loss_b, metrics)`` over ``B`` preference pairs.

    Inputs are ``[B]`` sequence log-probs of the chosen and rejected completions under the policy
    and the reference model, any float dtype, computed in float32. With
    ``delta = (chosen - ref_chosen) - (rejected - ref_rejected)`` and ``e = label_smoothing``:

    - ``sigmoid`` (DPO; cDPO when ``e > 0``): ``-(1 - e) log s(beta delta) - e log s(-beta delta)``;
    - ``hinge`` (SLiC): ``max(0, 1 - beta delta)``;
    - ``ipo``: ``(delta - 1 / (2 beta)) ** 2``; its authors score each completion by its mean
      token log-prob, so pass length-averaged log-probs for IPO;
    - ``robust``: ``(-(1 - e) log s(beta delta) + e log s(-beta delta)) / (1 - 2 e)``.

    ``s`` is the sigmoid, ``beta > 0``, ``0 <= e < 0.5`` (``e`` only for ``sigmoid`` and
    ``robust``). No gradient reaches the reference log-probs. Metrics (TRL's names, batch means):
    ``rewards/chosen`` ``beta (chosen - ref_chosen)``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies`` (chosen reward strictly above rejected), ``logps/chosen``,
    ``logps/rejected`` and ``tokens``, the number of pairs.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {PREFERENCE_LOSSES}")
    _check_positive("beta", beta)
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5)")
    if label_smoothing and loss_type in ("hinge", "ipo"):
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            "set label_smoothing=0 or use loss_type='sigmoid' or 'robust'"
        )
    c, r, ref_c, ref_r = _as_pairs(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    # The reference model is a fixed anchor even when its log-probs come from trainable code.
    ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
    delta = (c - ref_c) - (r - ref_r)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * jax.nn.log_sigmoid(beta * delta) - e * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - beta * delta)
    elif loss_type == "ipo":
        losses = jnp.square(delta - 1 / (2 * beta))
    else:
        losses = -(1 - e) * jax.nn.log_sigmoid(beta * delta) + e * jax.nn.log_sigmoid(-beta * delta)
        losses = losses / (1 - 2 * e)
    return losses.mean(), _reward_metrics(beta * (c - ref_c), beta * (r - ref_r), c, r)


def simpo_loss(chosen_avg_logps, rejected_avg_logps, *, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024): ``mean_b -log s(beta (c - r) - gamma)``, no reference model.

    ``c`` and ``r`` are ``[B]`` length-averaged (mean token) log-probs of the chosen and rejected
    completions; ``gamma`` is the target reward margin, ``beta > 0``. Metrics as in
    ``preference_loss`` with the rewards ``beta c`` and ``beta r``.
    """
    _check_positive("beta", beta)
    c, r = _as_pairs(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
    losses = -jax.nn.log_sigmoid(beta * (c - r) - gamma)
    return losses.mean(), _reward_metrics(beta * c, beta * r, c, r)


# ORPO's odds p / (1 - p) are infinite for a certain completion (p = 1); capping the mean token
# log-prob here caps log odds near 13.8 and leaves no gradient above the cap.
ORPO_MAX_LOGP = -1e-6


def orpo_loss(chosen_avg_logps, rejected_avg_logps, chosen_nll, *, lam: float = 0.1):
    """ORPO (Hong et al. 2024): ``mean(chosen_nll) + lam * mean_b -log s(log_odds)``.

    ``L = L_SFT + lam * L_OR`` with the paper's ``L_OR = -log s(log(odds(c) / odds(r)))`` and
    ``odds(x) = p / (1 - p)``, ``p = exp(x)``, so
    ``log_odds = (c - log(1 - exp(c))) - (r - log(1 - exp(r)))``. ``c`` and ``r`` are ``[B]``
    length-averaged log-probs (``<= 0``; capped at ``ORPO_MAX_LOGP`` inside the odds, see there),
    ``chosen_nll`` the ``[B]`` SFT loss of each chosen completion, ``lam >= 0`` (TRL's ``beta``).
    Metrics as TRL's ORPOTrainer logs them: the ``preference_loss`` ones with rewards ``lam c`` and
    ``lam r``, ``nll_loss``, ``log_odds_ratio`` the mean ``log s(log_odds)`` and
    ``log_odds_chosen`` the mean ``log_odds``.
    """
    if not lam >= 0:
        raise ValueError(f"lam={lam} must be >= 0 (0 is plain SFT on the chosen completions)")
    c, r, nll = _as_pairs(
        chosen_avg_logps=chosen_avg_logps,
        rejected_avg_logps=rejected_avg_logps,
        chosen_nll=chosen_nll,
    )
    c_capped, r_capped = jnp.minimum(c, ORPO_MAX_LOGP), jnp.minimum(r, ORPO_MAX_LOGP)
    log_odds = (c_capped - _log1mexp(c_capped)) - (r_capped - _log1mexp(r_capped))
    log_sig = jax.nn.log_sigmoid(log_odds)
    metrics = _reward_metrics(lam * c, lam * r, c, r)
    metrics["nll_loss"] = jax.lax.stop_gradient(nll).mean()
    metrics["log_odds_ratio"] = jax.lax.stop_gradient(log_sig).mean()
    metrics["log_odds_chosen"] = jax.lax.stop_gradient(log_odds).mean()
    return nll.mean() - lam * log_sig.mean(), metrics


def reward_model_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0):
    """Bradley-Terry reward-model loss ``mean_b -log s(r_c - r_r - margin)``, plus centering.

    ``r_c``, ``r_r`` and the optional ``margin`` are ``[B]`` (any float dtype, float32 math).
    ``center_coef`` (TRL's ``center_rewards_coefficient``) adds ``center_coef * mean((r_c + r_r)
    ** 2)``, pulling rewards towards zero mean. Metrics: ``accuracy`` (``r_c > r_r``), ``margin``
    (mean ``r_c - r_r``), ``mean_reward`` (over all 2B rewards) and ``tokens``, the number of pairs.
    """
    if not center_coef >= 0:
        raise ValueError(f"center_coef={center_coef} must be >= 0 (0 turns centering off)")
    arrays = {"chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
    if margin is not None:
        arrays["margin"] = margin
    rc, rr, *m = _as_pairs(**arrays)
    diff = rc - rr
    loss = -jax.nn.log_sigmoid(diff - m[0] if m else diff).mean()
    if center_coef:
        loss = loss + center_coef * jnp.square(rc + rr).mean()
    diff, rc, rr = (jax.lax.stop_gradient(x) for x in (diff, rc, rr))
    return loss, {
        "accuracy": (diff > 0).astype(jnp.float32).mean(),
        "margin": diff.mean(),
        "mean_reward": (rc.mean() + rr.mean()) / 2,
        "tokens": jnp.float32(diff.shape[0]),
    }


# The helpers below take ``[B]`` arrays, one entry per preference pair.


def _check_positive(name, value):
    if not value > 0:
        raise ValueError(f"{name}={value} must be positive")


def _as_pairs(**arrays):
    # Mismatched shapes would broadcast, [B] against [B, 1] into [B, B], and average silently.
    (first, x0), *_ = arrays.items()
    out = []
    for name, x in arrays.items():
        if jnp.ndim(x) != 1 or jnp.shape(x) != jnp.shape(x0):
            raise ValueError(
                f"{name} has shape {jnp.shape(x)}; pass a [B] array shaped like {first} "
                f"{jnp.shape(x0)}"
            )
        out.append(jnp.asarray(x).astype(jnp.float32))
    return out


def _reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    rc, rr, c, r = (
        jax.lax.stop_gradient(x)
        for x in (chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    )
    return {
        "rewards/chosen": rc.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (rc - rr).mean(),
        "rewards/accuracies": (rc > rr).astype(jnp.float32).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
        "tokens": jnp.float32(c.shape[0]),
    }


def _log1mexp(x):
    # log(1 - exp(x)) for x < 0, each branch where it keeps its digits (Maechler 2012); both stay
    # finite for x <= ORPO_MAX_LOGP, so the branch ``where`` drops sends no NaN into the gradient.
    return jnp.where(x > -math.log(2), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
