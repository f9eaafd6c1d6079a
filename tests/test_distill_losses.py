"""Distillation losses against a float64 NumPy reference, plus their invariants and edge cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.losses import (
    distill_loss,
    distill_loss_top_k,
    sequence_logprobs,
    teacher_log_normalizer,
    teacher_top_k,
)

B, T, V = 4, 6, 40
KINDS = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.3),
    ("jsd", 0.5),
    ("jsd", 0.9),
]
VARIANTS = [(kind, beta, 0) for kind, beta in KINDS] + [("forward_kl", 0.5, 5)]


def _inputs(seed, shape=(B, T, V), scale=3.0):
    rng = np.random.default_rng(seed)
    student = (scale * rng.standard_normal(shape)).astype(np.float32)
    teacher = (scale * rng.standard_normal(shape)).astype(np.float32)
    mask = rng.random(shape[:2]) < 0.7
    mask[0] = False  # a row with nothing to score
    mask[-1, 0] = True
    return student, teacher, mask


# NumPy float64 reference, written from the formulas rather than from llmjax.


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(logp, logq):
    return (np.exp(logp) * (logp - logq)).sum(-1)


def _np_distill(student, teacher, mask, kind="forward_kl", beta=0.5, temperature=1.0, top_k=0):
    s = student.astype(np.float64) / temperature
    t = teacher.astype(np.float64) / temperature
    logp_s, logp_t = _np_log_softmax(s), _np_log_softmax(t)
    if top_k:
        d = np.zeros(mask.shape)
        for b, i in np.ndindex(*mask.shape):
            ids = np.argsort(-t[b, i])[:top_k]
            logq = _np_log_softmax(t[b, i, ids])
            d[b, i] = _np_kl(logq, logp_s[b, i, ids])
    elif kind == "forward_kl":
        d = _np_kl(logp_t, logp_s)
    elif kind == "reverse_kl":
        d = _np_kl(logp_s, logp_t)
    else:
        logm = np.log(beta * np.exp(logp_t) + (1 - beta) * np.exp(logp_s))
        d = beta * _np_kl(logp_t, logm) + (1 - beta) * _np_kl(logp_s, logm)
    w = mask.astype(np.float64)
    kl = (d * w).sum() / max(w.sum(), 1.0)
    return temperature**2 * kl, kl


def _check(got, want):
    loss, metrics = got
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_matches_reference(kind, beta, temperature):
    for seed, scale in [(7301, 3.0), (7302, 0.3)]:
        student, teacher, mask = _inputs(seed, scale=scale)
        kw = dict(kind=kind, beta=beta, temperature=temperature)
        got = distill_loss(student, teacher, mask, **kw)
        _check(got, _np_distill(student, teacher, mask, **kw))
        assert got[1]["tokens"].dtype == jnp.float32 and float(got[1]["tokens"]) == mask.sum()
        # A 0/1 float mask is the bool mask.
        assert distill_loss(student, teacher, mask.astype(np.float32), **kw)[0] == got[0]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, V])
def test_top_k_matches_reference(k, temperature):
    student, teacher, mask = _inputs(7311)
    got = distill_loss(student, teacher, mask, temperature=temperature, top_k=k)
    _check(got, _np_distill(student, teacher, mask, temperature=temperature, top_k=k))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_of_whole_vocabulary_is_forward_kl(temperature):
    student, teacher, mask = _inputs(7321)
    full, full_metrics = distill_loss(student, teacher, mask, temperature=temperature)
    top, top_metrics = distill_loss(student, teacher, mask, temperature=temperature, top_k=V)
    np.testing.assert_allclose(top, full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(top_metrics["kl"], full_metrics["kl"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, V])
def test_top_k_is_cached_teacher_exactly(k):
    student, teacher, mask = _inputs(7331)
    ids_BTK, logits_BTK = teacher_top_k(teacher, k)
    assert ids_BTK.shape == logits_BTK.shape == (B, T, k)
    assert ids_BTK.dtype == jnp.int32 and logits_BTK.dtype == jnp.float32
    want = distill_loss_top_k(student, ids_BTK, logits_BTK, mask, temperature=1.5)
    got = distill_loss(student, teacher, mask, temperature=1.5, top_k=k)
    assert got[0] == want[0]
    assert got[1]["kl"] == want[1]["kl"]


def test_cached_logits_serve_every_temperature():
    # Renormalising the top-k of softmax(teacher / T) equals softmax(top-k logits / T).
    _, teacher, _ = _inputs(7332)
    ids_BTK, logits_BTK = teacher_top_k(teacher, 5)
    for temperature in (0.5, 1.0, 3.0):
        p_BTV = np.asarray(jax.nn.softmax(jnp.asarray(teacher) / temperature, axis=-1))
        p_BTK = np.take_along_axis(p_BTV, np.asarray(ids_BTK), axis=-1)
        want = p_BTK / p_BTK.sum(-1, keepdims=True)
        got = jax.nn.softmax(logits_BTK / temperature, axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 1.5, 2.0])
@pytest.mark.parametrize("kind,beta", KINDS)
def test_temperature_squared_scaling(kind, beta, temperature):
    student, teacher, mask = _inputs(7341)
    loss, metrics = distill_loss(
        student, teacher, mask, kind=kind, beta=beta, temperature=temperature
    )
    assert loss == np.float32(temperature**2) * metrics["kl"]


@pytest.mark.parametrize("kind,beta,top_k", VARIANTS)
def test_identical_logits_give_zero(kind, beta, top_k):
    student, _, mask = _inputs(7351)
    for temperature in (1.0, 2.0):
        loss, metrics = distill_loss(
            student, student, mask, kind=kind, beta=beta, temperature=temperature, top_k=top_k
        )
        if top_k:  # the student's mass off the teacher's top-k still counts, so only >= 0
            assert float(loss) >= 0
        else:
            np.testing.assert_allclose(loss, 0.0, atol=1e-6)
            np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-6)


@pytest.mark.parametrize("kind,beta,top_k", VARIANTS)
def test_divergence_per_token_is_non_negative(kind, beta, top_k):
    student, teacher, _ = _inputs(7361, scale=1.0)
    for b, i in np.ndindex(B, T):
        one_BT = np.zeros((B, T), bool)
        one_BT[b, i] = True  # the mean over one token is that token's divergence
        kl = distill_loss(student, teacher, one_BT, kind=kind, beta=beta, top_k=top_k)[1]["kl"]
        assert float(kl) >= 0, (b, i, kl)


@pytest.mark.parametrize("kind,beta,top_k", VARIANTS)
def test_bfloat16_logits(kind, beta, top_k):
    student, teacher, mask = _inputs(7371)
    s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
    kw = dict(kind=kind, beta=beta, temperature=2.0, top_k=top_k)
    loss_fn = lambda s: distill_loss(s, t16, mask, **kw)[0]
    loss, grad = jax.value_and_grad(loss_fn)(s16)
    assert np.isfinite(float(loss))
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))
    want = distill_loss(s16.astype(jnp.float32), t16.astype(jnp.float32), mask, **kw)[0]
    np.testing.assert_allclose(loss, want, rtol=1e-6)


def _loss_only(student, teacher, mask, **kw):
    return distill_loss(student, teacher, mask, **kw)[0]


@pytest.mark.parametrize("kind,beta,top_k", VARIANTS)
def test_extreme_logits_are_finite(kind, beta, top_k):
    rng = np.random.default_rng(7381)
    student = (1e4 * rng.choice([-1.0, 1.0], (B, T, V)) + rng.standard_normal((B, T, V))).astype(
        np.float32
    )
    teacher = np.zeros((B, T, V), np.float32)
    teacher[..., 3] = 1e4  # a teacher certain of one token the student may rule out entirely
    teacher[1] = -student[1]  # and one ranking every token opposite to the student
    mask = np.ones((B, T), bool)
    for temperature in (0.5, 1.0, 2.0):
        kw = dict(kind=kind, beta=beta, temperature=temperature, top_k=top_k)
        loss_fn = functools.partial(_loss_only, teacher=teacher, mask=mask, **kw)
        loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(student))
        assert np.isfinite(float(loss)) and float(loss) >= 0
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind,beta,top_k", [(k, b, 0) for k, b in KINDS] + [("forward_kl", 0, 8)])
def test_large_vocabulary(kind, beta, top_k):
    student, teacher, mask = _inputs(7391, shape=(2, 3, 32768))
    kw = dict(kind=kind, beta=beta, temperature=2.0, top_k=top_k)
    loss, grad = jax.value_and_grad(lambda s: distill_loss(s, teacher, mask, **kw)[0])(student)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(
        float(loss), _np_distill(student, teacher, mask, **kw)[0], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("fill", [np.nan, np.inf, 1e30, "noise"])
@pytest.mark.parametrize("kind,beta,top_k", VARIANTS)
def test_positions_outside_the_mask_do_not_leak(kind, beta, top_k, fill):
    student, teacher, mask = _inputs(7401)
    dirty_s, dirty_t = student.copy(), teacher.copy()
    if fill == "noise":
        rng = np.random.default_rng(7402)
        dirty_s[~mask] = 1e4 * rng.standard_normal(dirty_s[~mask].shape)
        dirty_t[~mask] = 1e4 * rng.standard_normal(dirty_t[~mask].shape)
    else:
        dirty_s[~mask] = fill
        dirty_t[~mask] = -fill
    kw = dict(kind=kind, beta=beta, temperature=2.0, top_k=top_k)

    def run(s, t):
        (loss, metrics), grad = jax.value_and_grad(
            lambda s: distill_loss(s, t, mask, **kw), has_aux=True
        )(jnp.asarray(s))
        return loss, metrics["kl"], grad

    clean, dirty = run(student, teacher), run(dirty_s, dirty_t)
    assert np.isfinite(float(dirty[0])) and np.all(np.isfinite(dirty[2]))
    for want, got in zip(clean, dirty, strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(dirty[2][~mask], 0.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_gradient_is_analytic(temperature):
    student, teacher, mask = _inputs(7411)
    grad = jax.grad(lambda s: distill_loss(s, teacher, mask, temperature=temperature)[0])(
        jnp.asarray(student)
    )
    p_s = np.exp(_np_log_softmax(student.astype(np.float64) / temperature))
    p_t = np.exp(_np_log_softmax(teacher.astype(np.float64) / temperature))
    want = np.where(mask[..., None], temperature * (p_s - p_t) / mask.sum(), 0.0)
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6)


def test_fully_masked_batch_is_zero():
    student, teacher, _ = _inputs(7421)
    mask = np.zeros((B, T), bool)
    for kind, beta in KINDS:
        loss, metrics = distill_loss(student, teacher, mask, kind=kind, beta=beta)
        assert float(loss) == 0.0 and float(metrics["tokens"]) == 0.0


def test_jit_matches_eager():
    student, teacher, mask = _inputs(7431)
    fn = functools.partial(distill_loss, kind="jsd", beta=0.3, temperature=2.0)
    np.testing.assert_allclose(
        jax.jit(fn)(student, teacher, mask)[0], fn(student, teacher, mask)[0], rtol=1e-6
    )


def _np_sequence_logprobs(logits, targets, mask):
    logp = _np_log_softmax(logits.astype(np.float64))
    out = np.zeros(mask.shape[0])
    for b, i in np.ndindex(*mask.shape):
        if mask[b, i]:
            out[b] += float(mask[b, i]) * logp[b, i, targets[b, i]]
    return out


@pytest.mark.parametrize("mask_dtype", [bool, np.float32])
def test_sequence_logprobs_matches_reference(mask_dtype):
    logits, _, mask = _inputs(7441)
    rng = np.random.default_rng(7442)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    targets[~mask] = -100  # Hugging Face's ignore index: never read
    mask = mask.astype(mask_dtype)
    got = sequence_logprobs(logits, targets, mask)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_sequence_logprobs(logits, targets, mask), rtol=1e-5)
    assert float(got[0]) == 0.0  # the fully masked row


def test_sequence_logprobs_bfloat16_and_garbage_outside_mask():
    logits, _, mask = _inputs(7451)
    rng = np.random.default_rng(7452)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    clean = jnp.asarray(logits, jnp.bfloat16)
    dirty = jnp.asarray(np.where(mask[..., None], logits, np.nan), jnp.bfloat16)

    def value_and_grad(x):
        return jax.value_and_grad(lambda x: sequence_logprobs(x, targets, mask).sum())(x)

    (want, want_grad), (got, got_grad) = value_and_grad(clean), value_and_grad(dirty)
    assert np.isfinite(float(got)) and np.all(np.isfinite(np.asarray(got_grad, np.float32)))
    assert got == want
    np.testing.assert_array_equal(np.asarray(got_grad), np.asarray(want_grad))
    np.testing.assert_allclose(
        sequence_logprobs(clean, targets, mask),
        _np_sequence_logprobs(np.asarray(clean, np.float32), targets, mask),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="kl"), "kind='kl'.*forward_kl.*reverse_kl.*jsd"),
        (dict(kind="jsd", beta=0.0), r"beta.*\(0, 1\)"),
        (dict(kind="jsd", beta=1.0), r"beta.*\(0, 1\)"),
        (dict(kind="jsd", beta=1.5), r"beta.*\(0, 1\)"),
        (dict(kind="reverse_kl", top_k=5), "top_k.*forward_kl"),
        (dict(kind="jsd", top_k=5), "top_k.*forward_kl"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=V + 1), f"k={V + 1}.*{V}"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0, top_k=3), "temperature"),
    ],
)
def test_bad_arguments(kwargs, match):
    student, teacher, mask = _inputs(7461)
    with pytest.raises(ValueError, match=match):
        distill_loss(student, teacher, mask, **kwargs)


def test_teacher_top_k_bad_k():
    _, teacher, _ = _inputs(7462)
    with pytest.raises(ValueError, match="k=0"):
        teacher_top_k(teacher, 0)


def _np_rest_bucket(student, teacher, mask, k, temperature):
    """Forward KL with the teacher's ids outside its top-k merged into one outcome."""
    logp_s = _np_log_softmax(student.astype(np.float64) / temperature)
    logp_t = _np_log_softmax(teacher.astype(np.float64) / temperature)
    d = np.zeros(mask.shape)
    for b, i in np.ndindex(*mask.shape):
        ids = np.argsort(-logp_t[b, i])[:k]
        q, p = np.exp(logp_t[b, i, ids]), np.exp(logp_s[b, i, ids])
        q_rest, p_rest = max(1 - q.sum(), 0.0), max(1 - p.sum(), 0.0)
        d[b, i] = (q * np.log(q / p)).sum()
        if q_rest > 1e-12:
            d[b, i] += q_rest * np.log(q_rest / p_rest)
    w = mask.astype(np.float64)
    kl = (d * w).sum() / max(w.sum(), 1.0)
    return temperature**2 * kl, kl


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 5, V - 1])
def test_top_k_rest_bucket_matches_reference(k, temperature):
    student, teacher, mask = _inputs(7471)
    kw = dict(temperature=temperature, top_k=k, top_k_rest="bucket")
    got = distill_loss(student, teacher, mask, **kw)
    _check(got, _np_rest_bucket(student, teacher, mask, k, temperature))
    # The cacheable pieces give the same numbers: ids, raw logits and the log-normaliser.
    ids, logits = teacher_top_k(teacher, k)
    logz = teacher_log_normalizer(teacher, temperature)
    cached = distill_loss_top_k(
        student, ids, logits, mask, temperature=temperature, teacher_logz_BT=logz
    )
    assert cached[0] == got[0]
    # A lower bound of the full forward KL (merging outcomes never raises a KL).
    full = distill_loss(student, teacher, mask, temperature=temperature)[0]
    assert float(got[0]) <= float(full) + 1e-6


def test_top_k_rest_bucket_of_whole_vocabulary_is_forward_kl():
    student, teacher, mask = _inputs(7472)
    full = distill_loss(student, teacher, mask)[0]
    top = distill_loss(student, teacher, mask, top_k=V, top_k_rest="bucket")[0]
    np.testing.assert_allclose(top, full, rtol=1e-5, atol=1e-6)


def test_top_k_rest_bucket_is_finite_and_keeps_the_students_tail():
    student, teacher, mask = _inputs(7473, scale=30.0)  # near one-hot teachers: tiny rests
    f = lambda s: distill_loss(s, teacher, mask, top_k=3, top_k_rest="bucket")[0]  # noqa: E731
    loss, grad = jax.value_and_grad(f)(jnp.asarray(student))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()
    # A student matching the teacher exactly has nothing left to learn, tail included.
    same = distill_loss(teacher, teacher, mask, top_k=3, top_k_rest="bucket")[0]
    np.testing.assert_allclose(float(same), 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="top_k_rest"):
        distill_loss(student, teacher, mask, top_k=3, top_k_rest="drop")
