"""RL losses (GRPO, Dr. GRPO, DAPO, PPO) against float64 NumPy formulas, plus gradients, the k3
estimator's expectation, masking and argument checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.losses import (
    POLICY_LOSSES,
    gae,
    group_advantages,
    policy_loss,
    token_entropy,
    value_loss,
    varied_groups,
)

TOKEN_SHAPES = [(1, 11), (6, 11)]  # a lone sequence, and a batch with an empty row
GROUP_SHAPES = [(1, 1), (1, 4), (4, 3), (6, 1)]  # (prompts, completions per prompt)
CLIP_METRICS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
L_MAX = 16  # dr_grpo's max_completion_length, above every T here


def _mask(rng, B, T):
    # Holes as well as padding; row 1 is empty whenever there are several rows.
    mask = rng.random((B, T)) < 0.7
    mask[0, 0] = True
    if B > 1:
        mask[1] = False
    return mask


def _rollout(seed, B, T, per_token):
    """Policy, sampling-time and reference log-probs, advantages and a mask, float32."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 4.0, (B, T))
    old = logps + rng.normal(0, 0.3, (B, T))  # ratios on both sides of both clip bounds
    ref = logps + rng.normal(0, 0.5, (B, T))
    adv = rng.normal(0, 1.0, (B, T) if per_token else B)
    f32 = [x.astype(np.float32) for x in (logps, old, adv, ref)]
    return (*f32, _mask(rng, B, T))


# NumPy float64 references, written from the papers' and TRL's definitions rather than from llmjax.


def _np_group_advantages(rewards, G, scale):
    r = np.asarray(rewards, np.float64)
    g = r.reshape(-1, G)
    group_std = g.std(1, ddof=1, keepdims=True) if G > 1 else np.zeros((len(g), 1))
    batch_std = r.std(ddof=1) if r.size > 1 else 0.0
    adv = g - g.mean(1, keepdims=True)
    if scale == "group":
        adv = adv / (group_std + 1e-4)
    elif scale == "batch":
        adv = adv / (batch_std + 1e-4)
    metrics = {
        "reward": r.mean(),
        "reward_std": batch_std,
        "frac_reward_zero_std": (g.max(1) == g.min(1)).mean(),
    }
    return adv.reshape(-1), metrics


def _np_policy(logps, old, adv, mask, ref, *, eps, eps_high, loss_type, beta):
    logps, old, adv, ref = (np.asarray(x, np.float64) for x in (logps, old, adv, ref))
    m = np.asarray(mask, np.float64)
    B, T = m.shape
    A = np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, (B, T))
    ratio = np.exp(logps - old)
    clipped = np.clip(ratio, 1 - eps, 1 + eps_high)
    per_token = -np.minimum(ratio * A, clipped * A)
    k3 = np.exp(ref - logps) - (ref - logps) - 1
    if beta:
        per_token = per_token + beta * k3
    n = max(m.sum(), 1.0)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / np.maximum(m.sum(1), 1.0)).mean()
        tokens = B
    elif loss_type == "dr_grpo":
        loss, tokens = (per_token * m).sum() / (B * L_MAX), B
    else:
        loss, tokens = (per_token * m).sum() / n, m.sum()
    low = (ratio < 1 - eps) & (A < 0)
    high = (ratio > 1 + eps_high) & (A > 0)
    metrics = {
        "clip_ratio/low_mean": (low * m).sum() / n,
        "clip_ratio/high_mean": (high * m).sum() / n,
        "clip_ratio/region_mean": ((low | high) * m).sum() / n,
        "tokens": float(tokens),
    }
    if beta:
        metrics["kl"] = (k3 * m).sum() / n
    return loss, metrics


def _np_gae_loop(rewards, values, mask, gamma, lam):
    """Per row, backwards over the masked tokens only; value and advantage 0 after the last."""
    B, T = mask.shape
    adv = np.zeros((B, T))
    for b in range(B):
        next_v = next_a = 0.0
        for t in reversed(range(T)):
            if mask[b, t]:
                next_a = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * next_a
                next_v = float(values[b, t])
                adv[b, t] = next_a
    return adv, np.where(mask, adv + values, 0.0)


def _check(got, want):
    loss, metrics = got
    want_loss, want_metrics = want
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    _check_metrics(metrics, want_metrics)


def _check_metrics(metrics, want):
    assert set(metrics) == set(want)
    for name, value in want.items():
        assert metrics[name].dtype == jnp.float32, name
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


# Group advantages.


@pytest.mark.parametrize("P,G", GROUP_SHAPES)
@pytest.mark.parametrize("kind", ["binary", "normal"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale, kind, P, G):
    rng = np.random.default_rng(8100 + 10 * P + G)
    if kind == "binary":  # verifiable rewards: some groups all right or all wrong
        rewards = (rng.random(P * G) < 0.5).astype(np.float32)
        rewards[:G] = 1.0
    else:
        rewards = rng.normal(0.3, 2.0, P * G).astype(np.float32)
    adv, metrics = group_advantages(rewards, G, scale=scale)
    want_adv, want_metrics = _np_group_advantages(rewards, G, scale)
    assert adv.dtype == jnp.float32 and adv.shape == (P * G,)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    _check_metrics(metrics, want_metrics)
    np.testing.assert_array_equal(
        np.asarray(varied_groups(rewards, G)), rewards.reshape(P, G).std(1) > 0
    )


def test_group_advantages_examples():
    rewards = np.array([1, 0, 0, 1, 1, 1, 0.5, 0.5, 0.5, 2, 2, 4], np.float32)
    adv, metrics = group_advantages(rewards, 3, scale="none")
    np.testing.assert_allclose(np.asarray(adv[:3]), [2 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    assert not np.any(np.asarray(adv[3:9]))  # equal rewards, exactly zero advantages
    assert float(metrics["frac_reward_zero_std"]) == 0.5
    assert np.asarray(varied_groups(rewards, 3)).tolist() == [True, False, False, True]
    # Rewards (1, 0, 0): unbiased std sqrt(1/3), so advantages (2/3, -1/3, -1/3) / 0.5774.
    adv, _ = group_advantages(rewards, 3, scale="group")
    want = np.array([2 / 3, -1 / 3, -1 / 3]) / (np.sqrt(1 / 3) + 1e-4)
    np.testing.assert_allclose(np.asarray(adv[:3]), want, rtol=1e-6)


def test_group_advantages_jit():
    rewards = np.random.default_rng(8101).normal(size=12).astype(np.float32)
    fn = jax.jit(group_advantages, static_argnums=1, static_argnames="scale")
    got, eager = fn(rewards, 3, scale="batch")[0], group_advantages(rewards, 3, scale="batch")[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(eager), rtol=1e-6, atol=1e-7)


# Policy loss.


@pytest.mark.parametrize("B,T", TOKEN_SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("loss_type", POLICY_LOSSES)
def test_policy_loss_matches_reference(loss_type, per_token, epsilon_high, beta, B, T):
    logps, old, adv, ref, mask = _rollout(8200 + B + T, B, T, per_token)
    got = policy_loss(
        logps,
        old,
        adv,
        mask,
        epsilon=0.2,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=L_MAX,
        ref_logps_BT=ref if beta else None,
        beta=beta,
    )
    eps_high = 0.2 if epsilon_high is None else epsilon_high
    want = _np_policy(
        logps, old, adv, mask, ref, eps=0.2, eps_high=eps_high, loss_type=loss_type, beta=beta
    )
    _check(got, want)


def test_clip_higher_changes_only_the_upper_bound():
    # ratio 1.25 with A > 0 is clipped at epsilon_high=0.2 but not at 0.28; ratio 0.75 with A < 0
    # is clipped at 1 - epsilon either way.
    logps = np.log(np.array([[1.25, 0.75] + [1.0] * 9], np.float32))
    old = np.zeros((1, 11), np.float32)
    adv = np.array([[1.0, -1.0] + [0.0] * 9], np.float32)
    mask = np.arange(11)[None] < 2
    for eps_high, loss, high in ((None, -(1.2 - 0.8) / 2, 0.5), (0.28, -(1.25 - 0.8) / 2, 0.0)):
        got, metrics = policy_loss(logps, old, adv, mask, epsilon_high=eps_high, loss_type="dapo")
        np.testing.assert_allclose(float(got), loss, rtol=1e-6)
        assert float(metrics["clip_ratio/high_mean"]) == high
        assert float(metrics["clip_ratio/low_mean"]) == 0.5


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("loss_type", POLICY_LOSSES)
def test_on_policy_gradient_is_analytic(loss_type, per_token, beta):
    # At ratio = 1 the surrogate's gradient is the policy gradient -A * grad(logp), weighted by
    # how the loss type spreads 1 over the tokens; k3 adds beta * (1 - exp(ref - logp)).
    logps, _, adv, ref, mask = _rollout(8300, 6, 11, per_token)
    fn = functools.partial(
        policy_loss,
        loss_type=loss_type,
        max_completion_length=L_MAX,
        ref_logps_BT=ref,
        beta=beta,
    )
    grad = jax.grad(lambda lp: fn(lp, logps, adv, mask)[0])(logps)
    m = mask.astype(np.float64)
    B = m.shape[0]
    A = adv[:, None] if adv.ndim == 1 else adv
    dl = -A + beta * (1 - np.exp(ref.astype(np.float64) - logps))
    weight = {
        "grpo": m / (B * np.maximum(m.sum(1, keepdims=True), 1.0)),
        "bnpo": m / m.sum(),
        "dapo": m / m.sum(),
        "dr_grpo": m / (B * L_MAX),
    }[loss_type]
    np.testing.assert_allclose(np.asarray(grad), dl * weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", POLICY_LOSSES)
def test_tokens_make_accumulation_exact(loss_type):
    # Micro-batch losses averaged with weights ``tokens`` equal the loss on the whole batch.
    logps, old, adv, ref, mask = _rollout(8400, 6, 11, per_token=False)
    fn = functools.partial(
        policy_loss, loss_type=loss_type, max_completion_length=L_MAX, ref_logps_BT=ref, beta=0.1
    )
    whole, _ = fn(logps, old, adv, mask)
    parts = [
        fn(logps[s], old[s], adv[s], mask[s], ref_logps_BT=ref[s])
        for s in (slice(0, 1), slice(1, 6))
    ]
    weights = np.array([float(aux["tokens"]) for _, aux in parts])
    losses = np.array([float(loss) for loss, _ in parts])
    accumulated = (weights * losses).sum() / weights.sum()
    np.testing.assert_allclose(accumulated, float(whole), rtol=1e-5)


def test_k3_estimates_the_exact_kl():
    # Tokens sampled from the policy: the mean of k3 is an unbiased estimate of KL(policy || ref).
    rng = np.random.default_rng(8500)
    logp = np.log(rng.dirichlet(np.ones(6)))
    logq = np.log(rng.dirichlet(np.ones(6)))
    p = np.exp(logp)
    exact = float((p * (logp - logq)).sum())
    k3_v = np.exp(logq - logp) - (logq - logp) - 1
    sd = np.sqrt((p * k3_v**2).sum() - exact**2)
    n = 200_000
    tokens = rng.choice(6, size=(200, n // 200), p=p)
    logps, ref = logp[tokens].astype(np.float32), logq[tokens].astype(np.float32)
    zeros = np.zeros(200, np.float32)
    mask = np.ones(tokens.shape, bool)
    loss, metrics = policy_loss(
        logps, logps, zeros, mask, ref_logps_BT=ref, beta=0.5, loss_type="dapo"
    )
    # Four standard errors: a fixed seed, and a false alarm under 1e-4 for any other.
    assert abs(float(metrics["kl"]) - exact) < 4 * sd / np.sqrt(n) + 1e-6
    np.testing.assert_allclose(float(loss), 0.5 * float(metrics["kl"]), rtol=1e-6)


@pytest.mark.parametrize("loss_type", POLICY_LOSSES)
@pytest.mark.parametrize("per_token", [False, True])
def test_nan_outside_mask_changes_nothing(per_token, loss_type):
    logps, old, adv, ref, mask = _rollout(8600, 6, 11, per_token)
    poison = np.where(np.arange(11) % 3 == 0, np.nan, np.inf).astype(np.float32)
    dirty = [np.where(mask, x, poison) for x in (logps, old, ref)]
    dirty_adv = np.where(mask, adv, -poison) if per_token else adv
    fn = functools.partial(
        policy_loss, loss_type=loss_type, max_completion_length=L_MAX, beta=0.1, epsilon_high=0.3
    )

    def run(lp, o, a, r):
        return jax.value_and_grad(lambda x: fn(x, o, a, mask, ref_logps_BT=r), has_aux=True)(lp)

    (clean_loss, clean_aux), clean_grad = run(logps, old, adv, ref)
    (loss, aux), grad = run(dirty[0], dirty[1], dirty_adv, dirty[2])
    assert float(loss) == float(clean_loss)
    assert {k: float(v) for k, v in aux.items()} == {k: float(v) for k, v in clean_aux.items()}
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
    assert not np.any(np.asarray(grad)[~mask])


def test_no_gradient_into_sampling_time_inputs():
    logps, old, adv, ref, mask = _rollout(8700, 6, 11, per_token=True)
    fn = functools.partial(policy_loss, ref_logps_BT=ref, beta=0.1)
    g_old, g_adv = jax.grad(lambda o, a: fn(logps, o, a, mask)[0], argnums=(0, 1))(old, adv)
    g_ref = jax.grad(lambda r: fn(logps, old, adv, mask, ref_logps_BT=r)[0])(ref)
    assert not any(np.any(np.asarray(g)) for g in (g_old, g_adv, g_ref))


def test_policy_loss_jit_and_bfloat16():
    logps, old, adv, ref, mask = _rollout(8800, 6, 11, per_token=False)
    fn = functools.partial(
        policy_loss, loss_type="dr_grpo", max_completion_length=L_MAX, ref_logps_BT=ref, beta=0.1
    )
    eager, jitted = fn(logps, old, adv, mask), jax.jit(fn)(logps, old, adv, mask)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    low = [jnp.asarray(x, jnp.bfloat16) for x in (logps, old, adv)]
    loss, metrics = fn(*low, mask)
    want, _ = fn(*[x.astype(jnp.float32) for x in low], mask)
    assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


# Entropy, GAE and the value loss.


def test_token_entropy_matches_reference():
    B, T = 6, 11
    rng = np.random.default_rng(8900)
    logits = rng.normal(0, 3.0, (B, T, 13)).astype(np.float32)
    mask = _mask(rng, B, T)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    want = (-(np.exp(logp) * logp).sum(-1) * mask).sum() / mask.sum()
    dirty = np.where(mask[..., None], logits, np.nan)
    got = token_entropy(dirty, mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    grad = jax.grad(lambda z: token_entropy(z, mask))(dirty)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("B,T", TOKEN_SHAPES)
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_python_loop(gamma, lam, B, T):
    rng = np.random.default_rng(9000 + B)
    rewards = rng.normal(0, 1.0, (B, T)).astype(np.float32)
    values = rng.normal(0, 1.0, (B, T)).astype(np.float32)
    mask = _mask(rng, B, T)
    adv, ret = gae(
        np.where(mask, rewards, np.nan), np.where(mask, values, np.inf), mask, gamma=gamma, lam=lam
    )
    want_adv, want_ret = _np_gae_loop(rewards, values, mask, gamma, lam)
    assert adv.dtype == ret.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_gae_right_padded_matches_full_length_recursion():
    # TRL's PPO zeroes padding's rewards and values and runs the recursion over every position;
    # with padding only on the right that is the same as skipping it.
    rng = np.random.default_rng(9100)
    B, T, gamma, lam = 6, 11, 0.98, 0.9
    lengths = np.array([11, 5, 1, 0, 10, 3])
    mask = np.arange(T)[None] < lengths[:, None]
    r = np.where(mask, rng.normal(size=(B, T)), 0.0)
    v = np.where(mask, rng.normal(size=(B, T)), 0.0)
    want, last = np.zeros((B, T)), np.zeros(B)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t < T - 1 else 0.0
        last = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last
        want[:, t] = last
    adv, _ = gae(r.astype(np.float32), v.astype(np.float32), mask, gamma=gamma, lam=lam)
    np.testing.assert_allclose(np.asarray(adv), want * mask, rtol=1e-5, atol=1e-5)
    # gamma = lam = 1: the reward still to come minus the value.
    adv, ret = gae(r.astype(np.float32), v.astype(np.float32), mask, gamma=1.0, lam=1.0)
    to_go = np.flip(np.cumsum(np.flip(r, 1), 1), 1)
    np.testing.assert_allclose(np.asarray(ret), to_go * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss_matches_reference(clip):
    B, T = 6, 11
    rng = np.random.default_rng(9200)
    old = rng.normal(0, 1.0, (B, T))
    values = old + rng.normal(0, 0.3, (B, T))
    returns = old + rng.normal(0, 1.0, (B, T))
    mask = _mask(rng, B, T)
    v_clip = old + np.clip(values - old, -clip, clip) if clip else values
    e1, e2 = (values - returns) ** 2, (v_clip - returns) ** 2
    n = mask.sum()
    want_loss = 0.5 * (np.maximum(e1, e2) * mask).sum() / n
    want = {"value_loss": want_loss, "value_clip_frac": ((e2 > e1) * mask).sum() / n, "tokens": n}
    f32 = [np.where(mask, x, np.nan).astype(np.float32) for x in (values, old, returns)]
    got = value_loss(*f32, mask, clip=clip)
    _check(got, (want_loss, want))
    grad = jax.grad(lambda v: value_loss(v, *f32[1:], mask, clip=clip)[0])(f32[0])
    assert np.isfinite(np.asarray(grad)).all() and not np.any(np.asarray(grad)[~mask])


_BT = np.zeros((6, 11), np.float32)
_M = np.ones((6, 11), bool)
_ADV = np.zeros(6, np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(np.zeros(6), 4), "group_size"),
        (lambda: group_advantages(np.zeros(6), 0), "group_size"),
        (lambda: group_advantages(np.zeros(6), 2.0), "group_size"),
        (lambda: group_advantages(np.zeros((2, 3)), 3), "rewards_N"),
        (lambda: group_advantages(np.zeros(6), 3, scale="std"), "scale"),
        (lambda: varied_groups(np.zeros(6), 4), "group_size"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, loss_type="ppo"), "loss_type"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, epsilon=0.0), "epsilon"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, epsilon=1.0), "epsilon"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, epsilon_high=-0.1), "epsilon_high"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, loss_type="dr_grpo"), "max_completion_length"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, beta=-0.1), "beta"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, beta=0.1), "ref_logps_BT"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M, beta=0.1, ref_logps_BT=_ADV), "ref_logps_BT"),
        (lambda: policy_loss(_BT, _BT[:, :2], _ADV, _M), "old_logps_BT"),
        (lambda: policy_loss(_BT, _BT, _ADV[:1], _M), "advantages"),
        (lambda: policy_loss(_BT, _BT, _BT[:, :2], _M), "advantages"),
        (lambda: policy_loss(_BT, _BT, _ADV, _M[:1]), "mask_BT"),
        (lambda: token_entropy(_BT, _M), "logits_BTV"),
        (lambda: gae(_BT, _BT, _M, gamma=1.5), "gamma"),
        (lambda: gae(_BT, _BT, _M, lam=-0.1), "lam"),
        (lambda: gae(_BT, _BT[:1], _M), "values_BT"),
        (lambda: value_loss(_BT, _BT, _BT, _M, clip=0.0), "clip"),
        (lambda: value_loss(_BT, _BT, _BT[0], _M), "returns_BT"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_beta_zero_never_reads_the_reference():
    loss, metrics = policy_loss(_BT, _BT, _ADV, _M, ref_logps_BT="not read", beta=0.0)
    assert float(loss) == 0.0 and "kl" not in metrics
