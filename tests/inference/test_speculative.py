"""Speculative decoding: exact under greedy, and distributed as the target when sampling."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.inference import generate
from llmjax.inference.speculative import speculative_generate

PROMPTS = [[1, 17, 33, 250, 9, 4], [1, 90], [1, 7, 7, 300]]


@pytest.fixture(scope="module")
def pair(llama):
    draft = llmjax.build("llama3-tiny", n_layers=1, init_std=0.3)
    return llama, (draft, draft.init(jax.random.key(7)))


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculative_equals_target_greedy(pair, k):
    (target, tp), (draft, dp) = pair
    ref = generate(target, tp, PROMPTS, max_new_tokens=20)
    out = speculative_generate(target, tp, draft, dp, PROMPTS, max_new_tokens=20, num_draft=k)
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    assert 0 <= out.acceptance_rate <= 1 and out.target_calls <= 20


def test_greedy_speculative_with_itself_accepts_everything_and_stops(pair):
    (target, tp), _ = pair
    ref = generate(target, tp, PROMPTS, max_new_tokens=20)
    stop = ref.tokens[0][5]
    ref = generate(target, tp, PROMPTS, max_new_tokens=20, stop_tokens=[stop])
    out = speculative_generate(
        target, tp, target, tp, PROMPTS, max_new_tokens=20, num_draft=4, stop_tokens=[stop]
    )
    assert out.tokens == ref.tokens and out.stopped == ref.stopped
    assert out.acceptance_rate == 1.0
    assert out.target_calls <= 1 + -(-19 // 5)  # k + 1 tokens per target call


def _exact_first_tokens(model, params, prompt, vocab):
    """Joint distribution ``[V, V, V]`` of the first three new tokens, by enumeration."""
    pairs = np.asarray(list(itertools.product(range(vocab), repeat=2)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1)
    probs = np.asarray(jax.nn.softmax(model.apply(params, jnp.asarray(seqs)), axis=-1))
    n = len(prompt)
    p1 = probs[0, n - 1]
    p2 = probs[::vocab, n].reshape(vocab, vocab)  # rows t1 (pairs[::V] are (t1, 0))
    p3 = probs[:, n + 1].reshape(vocab, vocab, vocab)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_critical(df, z=4.0):
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def test_sampled_speculative_matches_the_target_distribution():
    """Counts of (t2, t3), drawn with k=3 drafts, pass a chi-square test against the exact target
    distribution and fail it against the draft's: rejection sampling is what makes them agree."""
    V, rows = 6, 6000
    target = llmjax.build("llama3-tiny", vocab_size=V, init_std=0.3)
    draft = llmjax.build("llama3-tiny", vocab_size=V, init_std=0.3, n_layers=1)
    tp, dp = target.init(jax.random.key(3)), draft.init(jax.random.key(4))
    prompt = [1, 2, 3, 0]
    out = speculative_generate(
        target, tp, draft, dp, [prompt] * rows, max_new_tokens=4, num_draft=3, temperature=1.0
    )
    toks = np.asarray(out.tokens)
    assert 0.05 < out.acceptance_rate < 0.95  # both branches (accept and resample) were taken
    counts = np.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V)

    def chi2(joint):
        expected = rows * joint.sum(0).ravel()  # marginalise t1: cells (t2, t3)
        big = expected >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        keep = exp > 0
        return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum()) - 1

    target_joint = _exact_first_tokens(target, tp, prompt, V)
    draft_joint = _exact_first_tokens(draft, dp, prompt, V)
    stat, df = chi2(target_joint)
    assert stat < _chi2_critical(df), (stat, df)
    stat_draft, df_draft = chi2(draft_joint)
    assert stat_draft > 3 * _chi2_critical(df_draft), (stat_draft, df_draft)
    # and t1 (drawn by the target itself) too
    c1 = np.bincount(toks[:, 0], minlength=V)
    e1 = rows * target_joint.sum((1, 2))
    assert float(((c1 - e1) ** 2 / e1).sum()) < _chi2_critical(V - 1)


def test_mismatched_vocabularies_are_refused(pair):
    (target, tp), _ = pair
    other = llmjax.build("llama3-tiny", vocab_size=256)
    with pytest.raises(ValueError, match="tokenizer"):
        speculative_generate(target, tp, other, other.abstract_params(), [[1]], max_new_tokens=2)
