"""rollout: generate's tokens as arrays, inside jit, grad and cond; continuation_batch's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import InputError
from llmjax.inference import Rollout, SamplingConfig, continuation_batch, generate, rollout
from llmjax.inference.sampler import pad_prompts

DIFFERENT = [[1, 17, 33, 250, 9, 4], [1, 90], [1, 7, 7, 300]]
EQUAL = [[1, 17, 33, 250, 9, 4], [1, 90, 5, 6, 8, 2], [1, 7, 7, 300, 3, 11]]  # same [B, L]
N = 8
GREEDY = dict(temperature=0.0)
WARM = dict(temperature=1.0)
TOP_K = dict(temperature=0.7, top_k=20)


@pytest.fixture(scope="module")
def gpt2():
    model = llmjax.build("gpt2-tiny", init_std=0.3)
    return model, model.init(jax.random.key(0))


def arrays(prompts):
    tokens, lengths = pad_prompts(prompts, 512)
    return jnp.asarray(tokens), jnp.asarray(lengths)


def assert_same_as_generate(model, params, prompts, settings, seed, stops=(), masked=None):
    ref = generate(
        model, params, prompts, max_new_tokens=N, stop_tokens=stops, seed=seed, **settings
    )
    r = rollout(
        model, params, *arrays(prompts), jax.random.key(seed), max_new=N,
        sampling=SamplingConfig(**settings), stop_ids=stops, masked=masked,
    )  # fmt: skip
    tokens, logprobs = np.asarray(r.tokens_BN), np.asarray(r.logprobs_BN)
    assert np.asarray(r.lengths_B).tolist() == ref.lengths
    assert np.asarray(r.stopped_B).tolist() == ref.stopped
    for b, n in enumerate(ref.lengths):
        assert tokens[b, :n].tolist() == ref.tokens[b]
        np.testing.assert_allclose(logprobs[b, :n], ref.logprobs[b], atol=1e-6)
        end = n + ref.stopped[b]
        if ref.stopped[b]:
            assert tokens[b, n] in stops
        assert not tokens[b, end:].any() and not logprobs[b, end:].any()
    mask = np.arange(N)[None] < (np.asarray(ref.lengths) + np.asarray(ref.stopped))[:, None]
    np.testing.assert_array_equal(r.completion_mask_BN, mask)
    return tokens, ref.stopped


@pytest.mark.parametrize("settings", [GREEDY, WARM, TOP_K], ids=["greedy", "t1", "t0.7-top20"])
def test_same_tokens_as_generate_with_and_without_stops(llama, settings):
    model, params = llama
    free, _ = assert_same_as_generate(model, params, DIFFERENT, settings, seed=4)
    stops = (int(free[2, 5]),)  # one id: the same compiled loop as no stop ids ([-1])
    _, stopped = assert_same_as_generate(model, params, DIFFERENT, settings, seed=4, stops=stops)
    assert stopped[2]


@pytest.mark.parametrize("masked", [None, False])
def test_same_tokens_as_generate_for_prompts_of_one_length(llama, masked):
    model, params = llama
    for settings in (WARM, TOP_K):
        assert_same_as_generate(model, params, EQUAL, settings, seed=7, masked=masked)


def test_same_tokens_as_generate_on_gpt2(gpt2):
    model, params = gpt2
    free, _ = assert_same_as_generate(model, params, DIFFERENT, TOP_K, seed=2)
    stops = (int(free[1, 1]),)
    _, stopped = assert_same_as_generate(model, params, DIFFERENT, TOP_K, seed=2, stops=stops)
    assert stopped[1]


def reference_batch(prompts, completions, T):
    """``continuation_batch`` written out with Python lists, one row at a time."""
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
    out = {
        k: np.zeros((len(prompts), T), np.float32 if k == "loss_mask" else np.int32) for k in keys
    }
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq = (list(p) + list(c))[: T + 1]
        n = len(seq)
        out["tokens"][b, : min(n, T)] = seq[:T]
        out["targets"][b, : n - 1] = seq[1:]
        out["positions"][b, : min(n, T)] = np.arange(min(n, T))
        out["segment_ids"][b, : min(n, T)] = 1
        out["loss_mask"][b, len(p) - 1 : n - 1] = 1
    return out


def test_continuation_batch_equals_a_python_construction():
    rng = np.random.default_rng(0)
    B, L, new = 6, 7, 5
    build = jax.jit(continuation_batch, static_argnames="seq_len")
    for _ in range(3):
        lengths = rng.integers(1, L + 1, B)
        prompt = np.where(np.arange(L) < lengths[:, None], rng.integers(1, 99, (B, L)), 0)
        done = rng.integers(0, new + 1, B)  # tokens in each completion, a stop token included
        stopped = (done > 0) & (rng.random(B) < 0.5)
        tokens = np.where(np.arange(new) < done[:, None], rng.integers(1, 99, (B, new)), 0)
        r = Rollout(
            jnp.asarray(tokens, jnp.int32),
            jnp.zeros((B, new), jnp.float32),
            jnp.asarray(done - stopped, jnp.int32),
            jnp.asarray(stopped),
        )
        prompts = [prompt[b, : lengths[b]] for b in range(B)]
        completions = [tokens[b, : done[b]] for b in range(B)]
        for T in (L + new + 3, L + new - 1, 8, 4, 1):  # all rows fit, then cuts ever deeper
            got = build(jnp.asarray(prompt), jnp.asarray(lengths), r, seq_len=T)
            ref = reference_batch(prompts, completions, T)
            for k in ref:
                np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{k}, seq_len={T}")
                assert got[k].dtype == ref[k].dtype


def test_model_on_continuation_batch_scores_the_rollout_logprobs(llama):
    """Full-forward log-probs at the loss positions are the sampler's: the layout is right."""
    model, params = llama
    tokens, lengths = arrays(DIFFERENT)
    free = rollout(
        model, params, tokens, lengths, jax.random.key(0), max_new=N, sampling=SamplingConfig()
    )
    r = rollout(
        model, params, tokens, lengths, jax.random.key(0), max_new=N,
        sampling=SamplingConfig(), stop_ids=(int(free.tokens_BN[1, 3]),),
    )  # fmt: skip
    assert bool(r.stopped_B[1])
    batch = continuation_batch(tokens, lengths, r, tokens.shape[1] + N)
    logp = jax.jit(target_logprobs, static_argnums=0)(model, params, batch)
    scored = np.asarray(batch["loss_mask"]) == 1
    mask = np.asarray(r.completion_mask_BN)
    assert scored.sum(1).tolist() == mask.sum(1).tolist()
    np.testing.assert_allclose(np.asarray(logp)[scored], np.asarray(r.logprobs_BN)[mask], atol=1e-5)


def target_logprobs(model, params, batch):
    """``log p(targets)`` ``[B, T]`` under the full forward of a batch."""
    logits = model.apply(
        params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    return jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]


def nll(model, params, batch):
    logp = target_logprobs(model, params, batch)
    return -jnp.sum(logp * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])


def test_gradient_of_a_loss_that_samples_is_the_scoring_terms_gradient(llama):
    model, params = llama
    tokens, lengths = arrays(DIFFERENT)
    T = tokens.shape[1] + N

    def loss(p, key):
        r = rollout(model, jax.lax.stop_gradient(p), tokens, lengths, key, max_new=N)
        batch = continuation_batch(tokens, lengths, r, T)
        # The rollout's own log-probs enter the value (e.g. as a baseline) but carry no gradient.
        return nll(model, p, batch) + jnp.sum(r.logprobs_BN), batch

    key = jax.random.key(3)
    (value, batch), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, key)
    r = rollout(model, params, tokens, lengths, key, max_new=N)
    np.testing.assert_array_equal(
        batch["tokens"], continuation_batch(tokens, lengths, r, T)["tokens"]
    )
    term, ref = jax.jit(jax.value_and_grad(lambda p: nll(model, p, batch)))(params)
    np.testing.assert_allclose(value, term + jnp.sum(r.logprobs_BN), rtol=1e-5)
    for g, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_rollout_in_one_branch_of_a_traced_cond(llama):
    """On-policy with some probability: one branch samples, the other keeps the given batch."""
    model, params = llama
    tokens, lengths = arrays(DIFFERENT)
    T = tokens.shape[1] + N
    # Any batch of the same shapes stands for the offline data.
    offline = jax.tree.map(lambda x: x + 1, continuation_batch(tokens, lengths, empty_rollout(), T))

    @jax.jit
    def mix(params, key, on_policy):
        def sample(_):
            r = rollout(
                model, params, tokens, lengths, key, max_new=N, sampling=SamplingConfig(**TOP_K)
            )
            return continuation_batch(tokens, lengths, r, T)

        return jax.lax.cond(on_policy, sample, lambda batch: batch, offline)

    key = jax.random.key(5)
    r = rollout(model, params, tokens, lengths, key, max_new=N, sampling=SamplingConfig(**TOP_K))
    want = continuation_batch(tokens, lengths, r, T)
    for on_policy, ref in ((True, want), (False, offline)):
        got = mix(params, key, jnp.asarray(on_policy))
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def empty_rollout():
    zeros = jnp.zeros((len(DIFFERENT), N), jnp.int32)
    return Rollout(zeros, zeros.astype(jnp.float32), zeros[:, 0], zeros[:, 0].astype(bool))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(max_new=0), "max_new=0: must be an int >= 1"),
        (dict(stop_ids=(512,)), r"stop_ids\[0\]=512: is outside the vocabulary"),
        (dict(sampling=dict(temperature=1.0)), "sampling=.*must be a SamplingConfig"),
        (dict(tokens_BL=jnp.ones((6,), jnp.int32)), r"tokens_BL=int32\[6\] array: must be"),
        (
            dict(lengths_B=jnp.ones((2,), jnp.int32)),
            r"lengths_B=int32\[2\]: must be an int array \[3\]",
        ),
        (
            dict(max_new=124),
            "max_new=124: prompt length 6 \\+ max_new needs 129 positions, beyond max_seq_len=128",
        ),
    ],
)
def test_bad_static_arguments_raise_before_compiling(gpt2, change, match):
    model, params = gpt2
    tokens, lengths = arrays(DIFFERENT)
    kw = dict(tokens_BL=tokens, lengths_B=lengths, max_new=N) | change
    with pytest.raises(InputError, match=match) as err:
        rollout(model, params, key=jax.random.key(0), **kw)
    assert isinstance(err.value, ValueError)
