"""Preference losses against float64 NumPy formulas, plus their gradients and edge cases."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.losses import orpo_loss, preference_loss, reward_model_loss, simpo_loss

SIZES = [1, 33]  # a lone pair and a batch that is no power of two
PAIR_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "tokens",
}
# (loss_type, label_smoothing): smoothing only where the loss defines it.
PREFERENCE_VARIANTS = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.1),
    ("hinge", 0.0),
    ("ipo", 0.0),
    ("robust", 0.0),
    ("robust", 0.1),
]


def _policy_and_ref(seed, n):
    """Sequence log-probs of B pairs: policy and a reference a few nats away, float32."""
    rng = np.random.default_rng(seed)
    c = -rng.uniform(10, 60, n)
    r = -rng.uniform(10, 60, n)
    ref_c = c + rng.normal(0, 2, n)
    ref_r = r + rng.normal(0, 2, n)
    return [x.astype(np.float32) for x in (c, r, ref_c, ref_r)]


def _avg_logps(seed, n, low=0.05, high=3.0):
    rng = np.random.default_rng(seed)
    return [(-rng.uniform(low, high, n)).astype(np.float32) for _ in range(2)]


# NumPy float64 references, written from the papers' formulas rather than from llmjax.


def _np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _np_sigmoid(x):
    return np.exp(_np_log_sigmoid(x))


def _f64(*arrays):
    return [np.asarray(x, np.float64) for x in arrays]


def _np_pair_metrics(reward_c, reward_r, c, r):
    return {
        "rewards/chosen": reward_c.mean(),
        "rewards/rejected": reward_r.mean(),
        "rewards/margins": (reward_c - reward_r).mean(),
        "rewards/accuracies": (reward_c > reward_r).mean(),
        "logps/chosen": c.mean(),
        "logps/rejected": r.mean(),
        "tokens": float(len(c)),
    }


def _np_preference(c, r, ref_c, ref_r, loss_type, beta, eps):
    c, r, ref_c, ref_r = _f64(c, r, ref_c, ref_r)
    h = beta * ((c - ref_c) - (r - ref_r))
    if loss_type == "sigmoid":
        losses = -(1 - eps) * _np_log_sigmoid(h) - eps * _np_log_sigmoid(-h)
    elif loss_type == "hinge":
        losses = np.maximum(0.0, 1 - h)
    elif loss_type == "ipo":
        losses = (h / beta - 1 / (2 * beta)) ** 2
    else:
        losses = (-(1 - eps) * _np_log_sigmoid(h) + eps * _np_log_sigmoid(-h)) / (1 - 2 * eps)
    return losses.mean(), _np_pair_metrics(beta * (c - ref_c), beta * (r - ref_r), c, r)


def _np_simpo(c, r, beta, gamma):
    c, r = _f64(c, r)
    losses = -_np_log_sigmoid(beta * (c - r) - gamma)
    return losses.mean(), _np_pair_metrics(beta * c, beta * r, c, r)


def _np_orpo(c, r, nll, lam):
    c, r, nll = _f64(c, r, nll)
    pc, pr = np.exp(c), np.exp(r)
    log_odds = np.log(pc / (1 - pc)) - np.log(pr / (1 - pr))
    ratio = _np_log_sigmoid(log_odds)
    metrics = _np_pair_metrics(lam * c, lam * r, c, r)
    metrics.update(
        nll_loss=nll.mean(), log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean()
    )
    return nll.mean() + lam * (-ratio).mean(), metrics


def _np_reward(rc, rr, margin, center_coef):
    rc, rr = _f64(rc, rr)
    m = 0.0 if margin is None else np.asarray(margin, np.float64)
    loss = -_np_log_sigmoid(rc - rr - m).mean() + center_coef * ((rc + rr) ** 2).mean()
    metrics = {
        "accuracy": (rc > rr).mean(),
        "margin": (rc - rr).mean(),
        "mean_reward": np.concatenate([rc, rr]).mean(),
        "tokens": float(len(rc)),
    }
    return loss, metrics


def _check(got, want):
    loss, metrics = got
    want_loss, want_metrics = want
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-6)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        assert metrics[name].dtype == jnp.float32, name
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type,eps", PREFERENCE_VARIANTS)
def test_preference_matches_reference(loss_type, eps, beta, n):
    args = _policy_and_ref(7501 + n, n)
    got = preference_loss(*args, loss_type=loss_type, beta=beta, label_smoothing=eps)
    _check(got, _np_preference(*args, loss_type, beta, eps))
    assert set(got[1]) == PAIR_METRICS


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (10.0, 3.0), (1.0, 0.0)])
def test_simpo_matches_reference(beta, gamma, n):
    c, r = _avg_logps(7502 + n, n)
    _check(simpo_loss(c, r, beta=beta, gamma=gamma), _np_simpo(c, r, beta, gamma))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.25, 1.0])
def test_orpo_matches_reference(lam, n):
    c, r = _avg_logps(7503 + n, n)
    nll = np.random.default_rng(7504 + n).uniform(0.1, 3.0, n).astype(np.float32)
    _check(orpo_loss(c, r, nll, lam=lam), _np_orpo(c, r, nll, lam))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("center_coef", [0.0, 0.01])
@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_model_matches_reference(with_margin, center_coef, n):
    rng = np.random.default_rng(7505 + n)
    rc, rr = (rng.normal(0.5, 2.0, n).astype(np.float32) for _ in range(2))
    margin = rng.uniform(0, 2, n).astype(np.float32) if with_margin else None
    got = reward_model_loss(rc, rr, margin=margin, center_coef=center_coef)
    _check(got, _np_reward(rc, rr, margin, center_coef))


def test_jit_matches_eager():
    args = _policy_and_ref(7506, 8)
    fn = functools.partial(preference_loss, loss_type="robust", beta=0.3, label_smoothing=0.2)
    eager, jitted = fn(*args), jax.jit(fn)(*args)
    np.testing.assert_allclose(float(jitted[0]), float(eager[0]), rtol=1e-6)
    for name in eager[1]:
        np.testing.assert_allclose(float(jitted[1][name]), float(eager[1][name]), rtol=1e-6)


@pytest.mark.parametrize("loss_type,eps", PREFERENCE_VARIANTS)
def test_preference_stable_at_huge_margins(loss_type, eps):
    # beta * delta = -1e4, -10, 10, 1e4: log s(x) must not go through exp(-x).
    c = np.zeros(4, np.float32)
    r = np.array([1e5, 100.0, -100.0, -1e5], np.float32)
    zeros = np.zeros(4, np.float32)
    fn = functools.partial(preference_loss, loss_type=loss_type, beta=0.1, label_smoothing=eps)
    loss, _ = fn(c, r, zeros, zeros)
    np.testing.assert_allclose(
        float(loss), _np_preference(c, r, zeros, zeros, loss_type, 0.1, eps)[0], rtol=1e-5
    )
    grads = jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1))(c, r, zeros, zeros)
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("value", [0.0, -1e-9, -1e-7, -1e-3, -50.0, -1e4])
def test_orpo_finite_near_certain_and_hopeless(value):
    c = np.array([value, value, -0.5], np.float32)
    r = np.array([value, -0.5, value], np.float32)
    nll = np.ones(3, np.float32)
    loss, metrics = orpo_loss(c, r, nll, lam=0.5)
    assert np.isfinite(float(loss))
    assert all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.grad(lambda *a: orpo_loss(*a, lam=0.5)[0], argnums=(0, 1, 2))(c, r, nll)
    assert all(np.isfinite(g).all() for g in grads)


def test_orpo_matches_reference_near_zero():
    # Below the cap the float32 log-odds keep their digits; rtol reflects float32 inputs near 0.
    c = np.array([-1e-3, -2e-4, -40.0], np.float32)
    r = np.array([-3e-4, -1e-5, -50.0], np.float32)
    nll = np.ones(3, np.float32)
    loss, metrics = orpo_loss(c, r, nll, lam=1.0)
    want_loss, want = _np_orpo(c, r, nll, 1.0)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-4)
    np.testing.assert_allclose(
        float(metrics["log_odds_chosen"]), want["log_odds_chosen"], rtol=1e-4
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_identical_pairs(beta):
    c, _, ref_c, _ = _policy_and_ref(7507, 5)
    expected = {
        "sigmoid": math.log(2),
        "hinge": 1.0,
        "ipo": 1 / (4 * beta**2),
        "robust": math.log(2),
    }
    for loss_type, want in expected.items():
        eps = 0.2 if loss_type == "robust" else 0.0
        loss, metrics = preference_loss(
            c, c, ref_c, ref_c, loss_type=loss_type, beta=beta, label_smoothing=eps
        )
        np.testing.assert_allclose(float(loss), want, rtol=1e-6, err_msg=loss_type)
        assert float(metrics["rewards/accuracies"]) == 0.0
        assert float(metrics["rewards/margins"]) == 0.0
    assert float(simpo_loss(c, c, gamma=0.0)[1]["rewards/accuracies"]) == 0.0
    assert float(reward_model_loss(c, c)[1]["accuracy"]) == 0.0


@pytest.mark.parametrize("loss_type,eps", PREFERENCE_VARIANTS)
def test_no_gradient_into_reference_or_metrics(loss_type, eps):
    args = _policy_and_ref(7508, 6)
    fn = functools.partial(preference_loss, loss_type=loss_type, beta=0.5, label_smoothing=eps)
    g_ref_c, g_ref_r = jax.grad(lambda *a: fn(*a)[0], argnums=(2, 3))(*args)
    assert not np.any(np.asarray(g_ref_c)) and not np.any(np.asarray(g_ref_r))
    for name in ("rewards/margins", "rewards/chosen", "logps/chosen"):
        g = jax.grad(lambda *a, name=name: fn(*a)[1][name], argnums=(0, 1, 2, 3))(*args)
        assert not any(np.any(np.asarray(x)) for x in g), name


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_gradient_is_analytic(beta):
    c, r, ref_c, ref_r = _policy_and_ref(7509, 9)
    g_c, g_r = jax.grad(lambda *a: preference_loss(*a, beta=beta)[0], argnums=(0, 1))(
        c, r, ref_c, ref_r
    )
    c64, r64, ref_c64, ref_r64 = _f64(c, r, ref_c, ref_r)
    delta = (c64 - ref_c64) - (r64 - ref_r64)
    want = -beta * _np_sigmoid(-beta * delta) / len(c)
    np.testing.assert_allclose(np.asarray(g_c), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_r), -want, rtol=1e-5, atol=1e-6)


def test_orpo_gradient_is_the_papers():
    # d/dc of lam * -log s(log_odds) is -lam * s(-log_odds) / (1 - e^c): lam scales the odds term
    # only, and raising the chosen log-prob lowers the loss.
    c, r = _avg_logps(7510, 6)
    nll = np.random.default_rng(7511).uniform(0.5, 2.0, 6).astype(np.float32)
    lam = 0.3
    g_c, g_r, g_nll = jax.grad(lambda *a: orpo_loss(*a, lam=lam)[0], argnums=(0, 1, 2))(c, r, nll)
    c64, r64 = _f64(c, r)
    log_odds = (c64 - np.log1p(-np.exp(c64))) - (r64 - np.log1p(-np.exp(r64)))
    s = _np_sigmoid(-log_odds)
    n = len(c)
    np.testing.assert_allclose(
        np.asarray(g_c), -lam * s / (1 - np.exp(c64)) / n, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(g_r), lam * s / (1 - np.exp(r64)) / n, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(np.asarray(g_nll), np.full(n, 1 / n), rtol=1e-6)


def test_reward_model_gradient_is_analytic():
    rng = np.random.default_rng(7512)
    rc, rr, m = (rng.normal(0, 1.5, 5).astype(np.float32) for _ in range(3))
    coef = 0.05
    g_c, g_r = jax.grad(
        lambda a, b: reward_model_loss(a, b, margin=m, center_coef=coef)[0], argnums=(0, 1)
    )(rc, rr)
    rc64, rr64, m64 = _f64(rc, rr, m)
    s = _np_sigmoid(-(rc64 - rr64 - m64))
    center = 2 * coef * (rc64 + rr64)
    np.testing.assert_allclose(np.asarray(g_c), (-s + center) / 5, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_r), (s + center) / 5, rtol=1e-5, atol=1e-7)


def _bf16(*arrays):
    return [jnp.asarray(x, jnp.bfloat16) for x in arrays]


@pytest.mark.parametrize(
    "fn,make",
    [
        (
            functools.partial(preference_loss, loss_type="sigmoid", label_smoothing=0.1),
            lambda: _policy_and_ref(7513, 8),
        ),
        (functools.partial(preference_loss, loss_type="ipo"), lambda: _policy_and_ref(7514, 8)),
        (simpo_loss, lambda: _avg_logps(7515, 8)),
        (orpo_loss, lambda: [*_avg_logps(7516, 8), np.ones(8, np.float32)]),
        (reward_model_loss, lambda: _avg_logps(7517, 8)),
    ],
)
def test_bfloat16_inputs(fn, make):
    low = _bf16(*make())
    loss, metrics = fn(*low)
    want_loss, want_metrics = fn(*[x.astype(jnp.float32) for x in low])
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for name, value in want_metrics.items():
        assert metrics[name].dtype == jnp.float32, name
        np.testing.assert_allclose(float(metrics[name]), float(value), rtol=1e-6, err_msg=name)


_X = np.full(3, -1.0, np.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: preference_loss(_X, _X, _X, _X, loss_type="kto"), "loss_type"),
        (lambda: preference_loss(_X, _X, _X, _X, beta=0.0), "beta"),
        (lambda: preference_loss(_X, _X, _X, _X, beta=-1.0), "beta"),
        (lambda: preference_loss(_X, _X, _X, _X, label_smoothing=0.5), "label_smoothing"),
        (lambda: preference_loss(_X, _X, _X, _X, label_smoothing=-0.1), "label_smoothing"),
        (
            lambda: preference_loss(_X, _X, _X, _X, loss_type="hinge", label_smoothing=0.1),
            "label_smoothing",
        ),
        (
            lambda: preference_loss(_X, _X, _X, _X, loss_type="ipo", label_smoothing=0.1),
            "label_smoothing",
        ),
        (lambda: preference_loss(_X, _X, _X[:2], _X), "ref_chosen_logps"),
        (lambda: preference_loss(_X, _X[:, None], _X, _X), "rejected_logps"),
        (lambda: simpo_loss(_X, _X, beta=0.0), "beta"),
        (lambda: simpo_loss(_X, _X[:2]), "rejected_avg_logps"),
        (lambda: orpo_loss(_X, _X, _X, lam=-0.1), "lam"),
        (lambda: orpo_loss(_X, _X, _X[:2]), "chosen_nll"),
        (lambda: reward_model_loss(_X, _X, center_coef=-1.0), "center_coef"),
        (lambda: reward_model_loss(_X, _X, margin=_X[:1]), "margin"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
