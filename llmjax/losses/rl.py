"""Reinforcement learning on verifiable rewards: the group advantages and clipped policy losses of
GRPO, Dr. GRPO and DAPO, PPO's GAE and value loss, with TRL's metric names."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from llmjax.losses.core import _where_kept

ADVANTAGE_SCALES = ("group", "batch", "none")
POLICY_LOSSES = ("grpo", "bnpo", "dapo", "dr_grpo")
# Added to the std before dividing (TRL's constant): no division by zero, and a group whose rewards
# differ by far less than this gets advantages near 0 instead of +-1 from rounding noise.
STD_EPS = 1e-4


def group_advantages(rewards_N, group_size: int, *, scale: str = "group"):
    """GRPO's group-relative advantages of ``N = P * G`` completions: ``(advantages_N, metrics)``.

    ``rewards_N`` is prompt-major: the ``G = group_size`` completions of prompt ``p`` sit at
    ``p * G .. p * G + G - 1``. Each advantage is the reward minus its group's mean, then divided
    by ``std + STD_EPS`` where ``std`` is, by ``scale`` (TRL's ``scale_rewards``):

    - ``"group"`` (GRPO): the standard deviation of the group's ``G`` rewards;
    - ``"batch"``: the standard deviation of all ``N`` rewards (the mean stays the group's);
    - ``"none"`` (Dr. GRPO): no division at all.

    Standard deviations are unbiased (Bessel's ``n - 1``, as TRL's ``nanstd``); a single value has
    std 0. A group whose rewards are all equal gets advantages of exactly 0 (its float32 mean may
    round off the common value). float32 math. Metrics (TRL's names): ``reward`` the mean reward,
    ``reward_std`` the unbiased std of all ``N`` rewards, ``frac_reward_zero_std`` the fraction of
    groups whose rewards are all equal (TRL counts groups for ``"group"`` and ``"none"``; for
    ``"batch"`` it logs whether the batch std is 0, which says less, so groups are counted here
    for every ``scale``).
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale={scale!r} is unknown; use one of {ADVANTAGE_SCALES}")
    r_PG = _grouped(rewards_N, group_size)
    P, G = r_PG.shape
    varied_P = _varied(r_PG)
    centered_PG = jnp.where(varied_P[:, None], r_PG - r_PG.mean(1, keepdims=True), 0.0)
    if scale == "group":
        centered_PG = centered_PG / (_unbiased_std(centered_PG, axis=1)[:, None] + STD_EPS)
    elif scale == "batch":
        centered_PG = centered_PG / (_unbiased_std(r_PG - r_PG.mean()) + STD_EPS)
    metrics = {
        "reward": r_PG.mean(),
        "reward_std": _unbiased_std(r_PG - r_PG.mean()),
        "frac_reward_zero_std": 1.0 - varied_P.astype(jnp.float32).mean(),
    }
    return centered_PG.reshape(P * G), metrics


def varied_groups(rewards_N, group_size: int):
    """``[P]`` bool: which prompts' ``G`` rewards are not all equal (layout as in
    ``group_advantages``). DAPO's dynamic sampling keeps only these: a group of equal rewards has
    zero advantages and so no gradient."""
    return _varied(_grouped(rewards_N, group_size))


def policy_loss(
    logps_BT,
    old_logps_BT,
    advantages,
    mask_BT,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    ref_logps_BT=None,
    beta: float = 0.0,
):
    """PPO's clipped surrogate over completion tokens, aggregated as GRPO, DAPO or Dr. GRPO.

    ``logps_BT`` are the policy's log-probs of the sampled tokens (the only input that gets a
    gradient), ``old_logps_BT`` the same under the policy that sampled them, ``advantages`` one per
    sequence ``[B]`` (GRPO) or one per token ``[B, T]`` (PPO), ``mask_BT`` bool or float over the
    completion tokens. Per token, with ``ratio = exp(logps - old_logps)`` and ``A`` the advantage:

        ``l = -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3``

    ``epsilon_high`` defaults to ``epsilon`` (DAPO's clip-higher sets it larger, e.g. 0.28). With
    ``beta > 0`` the KL penalty to ``ref_logps_BT`` uses the unbiased, always non-negative
    estimator ``k3 = exp(ref - logps) - (ref - logps) - 1``, whose expectation over tokens sampled
    from the policy is ``KL(policy || ref)``; with ``beta = 0`` the reference is never read.

    ``loss_type`` aggregates ``l`` as TRL does:

    - ``"grpo"``: each sequence's mean over its tokens, then the mean over the ``B`` sequences
      (a sequence without tokens counts as 0);
    - ``"bnpo"``, ``"dapo"``: the mean over every token of the batch (TRL's ``dapo`` divides by the
      tokens of the whole accumulated batch, its ``bnpo`` by the micro-batch's; here both give the
      accumulated batch's mean, see ``tokens`` below);
    - ``"dr_grpo"``: the sum over tokens divided by ``B * max_completion_length`` (required; the
      generation's ``max_new_tokens``), a constant free of length bias.

    Positions the mask leaves out may hold anything, NaN and inf included. float32 math. Metrics
    (TRL's names, means over masked tokens): ``kl`` the mean ``k3`` (only with ``beta > 0``),
    ``clip_ratio/low_mean`` the fraction of tokens with ``ratio < 1 - epsilon`` and ``A < 0``,
    ``clip_ratio/high_mean`` with ``ratio > 1 + epsilon_high`` and ``A > 0``,
    ``clip_ratio/region_mean`` either, and ``tokens``.
    """
    if loss_type not in POLICY_LOSSES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; use one of {POLICY_LOSSES}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must lie in (0, 1); GRPO and PPO use 0.2")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    if not eps_high > 0:
        raise ValueError(f"epsilon_high={epsilon_high} must be positive, or None for epsilon")
    if loss_type == "dr_grpo" and not _positive_int(max_completion_length):
        raise ValueError(
            f"loss_type='dr_grpo' divides by B * max_completion_length; got "
            f"max_completion_length={max_completion_length!r}, pass the generation's positive "
            "max_new_tokens"
        )
    if not beta >= 0:
        raise ValueError(f"beta={beta} must be >= 0 (0 turns the KL penalty off)")
    if beta > 0 and ref_logps_BT is None:
        raise ValueError(f"beta={beta} penalises KL to a reference: pass ref_logps_BT or beta=0")
    arrays = {"logps_BT": logps_BT, "old_logps_BT": old_logps_BT, "mask_BT": mask_BT}
    if beta > 0:
        arrays["ref_logps_BT"] = ref_logps_BT
    B, T = _check_tokens(**arrays)
    if jnp.shape(advantages) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages has shape {jnp.shape(advantages)}; pass one per sequence [{B}] or one "
            f"per token [{B}, {T}] like logps_BT"
        )
    keep_BT, mask = _keep_and_weight(mask_BT)
    logps = _kept(logps_BT, keep_BT)
    # Sampling-time quantities are constants of the objective, even when computed by traced code.
    old = jax.lax.stop_gradient(_kept(old_logps_BT, keep_BT))
    adv_BT = jnp.broadcast_to(jnp.asarray(advantages).reshape(B, -1), (B, T))
    adv = jax.lax.stop_gradient(_kept(adv_BT, keep_BT))

    ratio = jnp.exp(logps - old)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics = {}
    if beta > 0:
        log_q_over_p = jax.lax.stop_gradient(_kept(ref_logps_BT, keep_BT)) - logps
        k3 = jnp.exp(log_q_over_p) - log_q_over_p - 1
        per_token = per_token + beta * k3
        metrics["kl"] = _token_mean(jax.lax.stop_gradient(k3), mask)
    # ``tokens`` is the weight that makes accumulated micro-batches equal one step on the whole
    # batch: the loss's own denominator where it is a count of tokens (bnpo, dapo), the number of
    # sequences where the loss is a mean over sequences (grpo) or a sum over a fixed B * L
    # (dr_grpo: weighting S_i / (B_i L) by B_i gives sum_i S_i / (B L)). For those two the token
    # metrics are then averaged over micro-batches by sequence count, which for micro-batches of
    # equal size is TRL's plain average.
    weighted = per_token * mask
    if loss_type == "grpo":
        per_seq = weighted.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        loss, tokens = per_seq.mean(), jnp.float32(B)
    elif loss_type == "dr_grpo":
        loss, tokens = weighted.sum() / (B * max_completion_length), jnp.float32(B)
    else:
        loss, tokens = weighted.sum() / jnp.maximum(mask.sum(), 1.0), mask.sum()

    ratio = jax.lax.stop_gradient(ratio)
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    metrics["clip_ratio/low_mean"] = _token_mean(low, mask)
    metrics["clip_ratio/high_mean"] = _token_mean(high, mask)
    metrics["clip_ratio/region_mean"] = _token_mean(low | high, mask)
    metrics["tokens"] = tokens
    return loss, metrics


def token_entropy(logits_BTV, mask_BT):
    """Mean entropy in nats of the policy's next-token distributions over the masked tokens
    (TRL's ``entropy`` metric), float32. Logits must be finite where the mask is set and may hold
    anything where it is not; differentiable, so it can also serve as an entropy bonus."""
    if jnp.ndim(logits_BTV) != 3 or jnp.shape(logits_BTV)[:2] != jnp.shape(mask_BT):
        raise ValueError(
            f"logits_BTV has shape {jnp.shape(logits_BTV)}; pass [B, T, V] logits with mask_BT "
            f"{jnp.shape(mask_BT)} as its first two dimensions"
        )
    keep_BT, mask = _keep_and_weight(mask_BT)
    logp_BTV = jax.nn.log_softmax(_where_kept(logits_BTV, keep_BT), axis=-1)
    entropy_BT = -(jnp.exp(logp_BTV) * logp_BTV).sum(-1)
    return _token_mean(entropy_BT, mask)


def gae(rewards_BT, values_BT, mask_BT, *, gamma: float = 1.0, lam: float = 0.95):
    """PPO's generalized advantage estimation over completion tokens: ``(advantages_BT,
    returns_BT)``, float32, 0 where the mask is unset, no gradient.

    Walking back over the masked tokens of each row, ``delta_t = r_t + gamma * V_next - V_t`` and
    ``A_t = delta_t + gamma * lam * A_next``, where ``next`` is the row's next masked token; the
    value and advantage after the last one are 0 (the episode ends with the completion).
    ``returns = A + V``, the value head's targets. A masked-out position (padding, or tool output
    inside a completion) is skipped: it takes no step of discount and its reward and value are
    ignored, so a sequence-level reward belongs on the last masked token. ``gamma`` and ``lam`` lie
    in [0, 1]; ``gamma = lam = 1`` gives Monte Carlo returns minus the value.
    """
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value} must lie in [0, 1]")
    B, T = _check_tokens(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    keep_BT = jnp.asarray(mask_BT).astype(bool)
    r_BT = jax.lax.stop_gradient(_kept(rewards_BT, keep_BT))
    v_BT = jax.lax.stop_gradient(_kept(values_BT, keep_BT))

    def step(carry, x):
        next_v, next_a = carry
        r, v, keep = x
        a = r + gamma * next_v - v + gamma * lam * next_a
        # A skipped position hands the next real token's value and advantage on unchanged.
        return (jnp.where(keep, v, next_v), jnp.where(keep, a, next_a)), jnp.where(keep, a, 0.0)

    zeros = jnp.zeros(B, jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros, zeros), (r_BT.T, v_BT.T, keep_BT.T), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, jnp.where(keep_BT, adv_BT + v_BT, 0.0)


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, *, clip: float | None = 0.2):
    """PPO's clipped value loss ``0.5 * mean_t max((v - R)^2, (v_clip - R)^2)`` over masked tokens.

    ``v_clip = old + clip(v - old, -clip, clip)`` keeps the value head near the values it had when
    the returns ``R`` were computed; ``clip=None`` drops the clipped term. Only ``values_BT`` gets
    a gradient; masked-out positions may hold anything. float32 math. Metrics (TRL's PPO logs the
    same two as ``loss/value_avg`` and ``val/clipfrac_avg``): ``value_loss``, ``value_clip_frac``
    the fraction of tokens where the clipped error is the larger, and ``tokens``.
    """
    if clip is not None and not clip > 0:
        raise ValueError(f"clip={clip} must be positive, or None to leave the values unclipped")
    _check_tokens(
        values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT
    )
    keep_BT, mask = _keep_and_weight(mask_BT)
    v = _kept(values_BT, keep_BT)
    old = jax.lax.stop_gradient(_kept(old_values_BT, keep_BT))
    ret = jax.lax.stop_gradient(_kept(returns_BT, keep_BT))
    err = jnp.square(v - ret)
    v_clipped = v if clip is None else old + jnp.clip(v - old, -clip, clip)
    err_clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * _token_mean(jnp.maximum(err, err_clipped), mask)
    return loss, {
        "value_loss": jax.lax.stop_gradient(loss),
        "value_clip_frac": _token_mean(jax.lax.stop_gradient(err_clipped > err), mask),
        "tokens": mask.sum(),
    }


def _positive_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x > 0


# Helpers on ``[P, G]`` groups of rewards.


def _grouped(rewards_N, group_size):
    if jnp.ndim(rewards_N) != 1 or jnp.shape(rewards_N)[0] == 0:
        raise ValueError(f"rewards_N has shape {jnp.shape(rewards_N)}; pass a non-empty [N] array")
    N = jnp.shape(rewards_N)[0]
    if not (_positive_int(group_size) and N % group_size == 0):
        raise ValueError(
            f"group_size={group_size!r} must be a positive int dividing the {N} rewards "
            "(N = prompts * completions per prompt)"
        )
    return jnp.asarray(rewards_N).astype(jnp.float32).reshape(N // group_size, group_size)


def _varied(r_PG):
    return r_PG.max(1) > r_PG.min(1)


def _unbiased_std(centered, axis=None):
    n = centered.size if axis is None else centered.shape[axis]
    if n < 2:
        return jnp.zeros(() if axis is None else centered.shape[:axis], jnp.float32)
    return jnp.sqrt(jnp.square(centered).sum(axis) / (n - 1))


# Helpers on ``[B, T]`` token arrays.


def _check_tokens(**arrays):
    # Mismatched shapes would broadcast ([B, T] against [B, 1]) and average silently.
    (first, x0), *_ = arrays.items()
    for name, x in arrays.items():
        if jnp.ndim(x) != 2 or jnp.shape(x) != jnp.shape(x0):
            raise ValueError(
                f"{name} has shape {jnp.shape(x)}; pass a [B, T] array shaped like {first} "
                f"{jnp.shape(x0)}"
            )
    return jnp.shape(x0)


def _keep_and_weight(mask_BT):
    mask_BT = jnp.asarray(mask_BT)
    keep_BT = mask_BT.astype(bool)
    return keep_BT, jnp.where(keep_BT, mask_BT.astype(jnp.float32), 0.0)


def _kept(x_BT, keep_BT):
    # Zeroed before use, not after: a NaN left in would reach the gradient through the zero
    # cotangent a later ``where`` sends it.
    return jnp.where(keep_BT, jnp.asarray(x_BT).astype(jnp.float32), 0.0)


def _token_mean(x_BT, mask):
    return (x_BT * mask).sum() / jnp.maximum(mask.sum(), 1.0)
