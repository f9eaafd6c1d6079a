"""Knowledge distillation: divergences between a student's and a teacher's token distributions,
over the whole vocabulary or a teacher's top-k."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llmjax.losses.core import _log1mexp, _where_kept

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


def _log_probs(logits_BTX, keep_BT, temperature):
    return jax.nn.log_softmax(_where_kept(logits_BTX, keep_BT) / temperature, axis=-1)


def _kl(logp_BTX, logq_BTX):
    # p = exp(log p) underflows to an exact 0 rather than pairing 0 with log 0 = -inf.
    return (jnp.exp(logp_BTX) * (logp_BTX - logq_BTX)).sum(-1)


def _distill_mean(d_BT, mask_BT, temperature):
    mask = mask_BT.astype(jnp.float32)
    kl = jnp.where(mask_BT.astype(bool), d_BT * mask, 0.0).sum() / jnp.maximum(mask.sum(), 1.0)
    return temperature**2 * kl, {"kl": kl, "tokens": mask.sum()}
