"""Preference tuning on ``[B]`` per-pair log-probs or rewards, with TRL's metric names."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.losses.core import _log1mexp

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
