"""Each logit processor, checked on real samples against the full forward's distributions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from llmjax.inference import SamplingConfig, generate
from llmjax.inference.processors import argmax
from llmjax.inference.processors import penalize as _penalize
from tests.inference.conftest import batch_step_logits

PROMPT = [1, 17, 33, 250, 9]
N_ROWS, N_NEW = 48, 6  # many rows of one prompt: each row draws with its own key


def _sample(model, params, **kw):
    out = generate(model, params, [PROMPT] * N_ROWS, max_new_tokens=N_NEW, seed=11, **kw)
    assert out.lengths == [N_NEW] * N_ROWS
    toks = np.asarray(out.tokens)
    logits = batch_step_logits(model, params, PROMPT, toks)  # [R, N, V]
    return toks, logits


def _probs(logits, temperature=1.0):
    z = logits / temperature
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_temperature_zero_is_greedy_and_top_k_one_is_too(llama):
    model, params = llama
    greedy, logits = _sample(model, params)
    assert (greedy == logits.argmax(-1)).all()
    top1, _ = _sample(model, params, temperature=1.3, top_k=1)
    assert (top1 == greedy).all()


def test_top_k_never_leaves_the_top_k(llama):
    model, params = llama
    toks, logits = _sample(model, params, temperature=2.0, top_k=4)
    rank = (logits > np.take_along_axis(logits, toks[..., None], -1)).sum(-1)
    assert rank.max() < 4
    assert rank.max() > 0  # it did sample, not just take the argmax
    assert len(np.unique(toks[:, 0])) > 1


def test_top_p_stays_in_the_nucleus(llama):
    model, params = llama
    p, temp = 0.6, 1.5
    toks, logits = _sample(model, params, temperature=temp, top_p=p)
    probs = _probs(logits, temp)
    chosen = np.take_along_axis(probs, toks[..., None], -1)
    mass_above = np.where(probs > chosen, probs, 0).sum(-1)  # mass of strictly likelier tokens
    assert mass_above.max() < p + 1e-5
    assert len(np.unique(toks[:, 0])) > 1


def test_min_p_never_emits_below_its_threshold(llama):
    model, params = llama
    min_p = 0.2
    toks, logits = _sample(model, params, temperature=1.0, min_p=min_p)
    probs = _probs(logits)
    chosen = np.take_along_axis(probs, toks[..., None], -1)[..., 0]
    assert (chosen >= min_p * probs.max(-1) - 1e-6).all()
    # Without min-p the same sampler does go below the threshold, so the check can fail.
    free, free_logits = _sample(model, params, temperature=1.0)
    fp = _probs(free_logits)
    free_chosen = np.take_along_axis(fp, free[..., None], -1)[..., 0]
    assert (free_chosen < min_p * fp.max(-1)).any()


def test_forbidden_tokens_never_appear(llama):
    model, params = llama
    greedy, _ = _sample(model, params)
    sampled, _ = _sample(model, params, temperature=1.0, top_k=3)
    banned = sorted(set(greedy.ravel()) | set(sampled[:, :2].ravel()))
    toks, logits = _sample(model, params, temperature=1.0, top_k=3, forbidden_tokens=banned)
    assert not np.isin(toks, banned).any()
    # and the remaining choices are still the top 3 of what is allowed
    logits[..., banned] = -np.inf
    rank = (logits > np.take_along_axis(logits, toks[..., None], -1)).sum(-1)
    assert rank.max() < 3


def penalize(logits, cfg, seen, counts):
    return _penalize(logits, cfg.params(logits.shape[-1]), cfg.mode, seen, counts)


def test_penalties_follow_their_formulas():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 3.0]])
    seen = jnp.asarray([[True, True, False, False]])
    counts = jnp.asarray([[0, 2, 1, 0]])
    rep = penalize(logits, SamplingConfig(repetition_penalty=2.0), seen, counts)
    np.testing.assert_allclose(rep, [[1.0, -2.0, 0.5, 3.0]])
    freq = penalize(logits, SamplingConfig(frequency_penalty=0.5), seen, counts)
    # off means off: no history penalty without the settings
    np.testing.assert_allclose(penalize(logits, SamplingConfig(), seen, counts), logits)
    np.testing.assert_allclose(freq, [[2.0, -2.0, 0.0, 3.0]])
    both = penalize(
        logits, SamplingConfig(repetition_penalty=2.0, frequency_penalty=0.5), seen, counts
    )
    np.testing.assert_allclose(both, [[1.0, -3.0, 0.0, 3.0]])
    banned = penalize(logits, SamplingConfig(forbidden_tokens=(3,)), seen, counts)
    assert np.isneginf(banned[0, 3])


def test_penalties_change_greedy_decoding_as_specified(llama):
    """Greedy with penalties equals the argmax of the numpy-penalised full-forward logits."""
    model, params = llama
    prompt, n, rep, freq = [1, 5, 6], 28, 1.5, 0.7
    plain = generate(model, params, [prompt], max_new_tokens=n).tokens[0]
    assert len(set(plain)) < n  # this model repeats itself when greedy
    out = generate(
        model, params, [prompt], max_new_tokens=n, repetition_penalty=rep, frequency_penalty=freq
    ).tokens[0]
    assert out != plain
    logits = np.array(model.apply(params, jnp.asarray([prompt + out]))[0, len(prompt) - 1 : -1])
    for i, row in enumerate(logits):
        history = prompt + out[:i]
        seen = np.isin(np.arange(row.size), history)
        row = np.where(seen, np.where(row > 0, row / rep, row * rep), row)
        row = row - freq * np.bincount(out[:i], minlength=row.size)
        assert out[i] == int(row.argmax())
    huge = generate(model, params, [prompt], max_new_tokens=n, frequency_penalty=1e4).tokens[0]
    assert len(set(huge)) == n  # a huge per-occurrence penalty forbids any repeat


def test_argmax_matches_jnp_argmax_on_ties_infinities_and_nan():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, (64, 50)).astype(np.float32)  # many ties: the first maximum wins
    x[1] = -np.inf
    x[2, 7] = np.inf
    x[3, [4, 9]] = np.nan  # jnp.argmax reports the first NaN
    x[4, :] = np.nan
    x[5, [0, 49]] = [np.nan, np.inf]
    got = np.asarray(argmax(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got[1] == 0 and got[2] == 7 and got[3] == 4 and got[4] == 0 and got[5] == 0
