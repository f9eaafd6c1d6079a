"""The sampler: cache decoding against the full forward, batching, stop tokens, reproducibility."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import llmjax
from llmjax.inference import generate
from tests.inference.conftest import step_logits

PROMPTS = [[1, 17, 33, 250, 9, 4], [1, 90], [1, 7, 7, 300]]


@pytest.mark.parametrize(
    "preset", ["llama3-tiny", "mistral-tiny", "gemma2-tiny", "gemma3-tiny", "gpt2-tiny"]
)
def test_cache_decoding_equals_full_forward(preset):
    """Greedy tokens are the full forward's argmax and log-probs match it, past every window."""
    model = llmjax.build(preset, init_std=0.3)
    params = model.init(jax.random.key(1))
    assert_greedy_matches_full_forward(model, params, PROMPTS)  # 6 + 24 > sliding window 16


@pytest.mark.parametrize("preset", ["mistral-tiny", "gemma2-tiny", "gemma3-tiny"])
def test_ring_cache_decoding_past_a_short_window_equals_full_forward(preset):
    """Window 4: prompts longer than it in a padded batch, 24 tokens generated past it; the
    sliding-window layers decode from ring buffers of 4 entries."""
    model = llmjax.build(preset, init_std=0.3, sliding_window=4)
    params = model.init(jax.random.key(1))
    assert model.init_cache(3, 33).ring_len == 4
    assert_greedy_matches_full_forward(model, params, [PROMPTS[0] * 2, PROMPTS[1], PROMPTS[2]])


def assert_greedy_matches_full_forward(model, params, prompts):
    out = generate(model, params, prompts, max_new_tokens=24)
    assert out.lengths == [24] * len(prompts) and not any(out.stopped)
    for prompt, toks, logps in zip(prompts, out.tokens, out.logprobs, strict=True):
        ref = step_logits(model, params, prompt, toks)
        chosen = ref[np.arange(len(toks)), toks]
        np.testing.assert_array_less(ref.max(-1) - chosen, 1e-4)  # argmax up to rounding
        ref_logp = chosen - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) - ref.max(-1)
        np.testing.assert_allclose(logps, ref_logp, atol=1e-4)


def test_batched_prompts_of_different_lengths_equal_each_alone(llama):
    model, params = llama
    both = generate(model, params, PROMPTS, max_new_tokens=10)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(model, params, [prompt], max_new_tokens=10)
        assert alone.tokens[0] == both.tokens[b]
        np.testing.assert_allclose(alone.logprobs[0], both.logprobs[b], atol=1e-5)


def test_stop_tokens_end_only_their_sequence(llama):
    model, params = llama
    free = generate(model, params, PROMPTS, max_new_tokens=10)
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    out = generate(model, params, PROMPTS, max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:first] and out.stopped[0]
    assert out.lengths[0] == first
    for b in (1, 2):
        toks = free.tokens[b]
        n = toks.index(stop) if stop in toks else len(toks)
        assert out.tokens[b] == toks[:n] and out.stopped[b] == (stop in toks)


def test_seeded_sampling_is_reproducible_and_seed_dependent(llama):
    model, params = llama
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
    a = generate(model, params, PROMPTS, seed=5, **kw)
    b = generate(model, params, PROMPTS, seed=5, **kw)
    c = generate(model, params, PROMPTS, seed=6, **kw)
    assert a == b
    assert a.tokens != c.tokens


def test_streaming_callback_sees_the_same_tokens(llama):
    model, params = llama
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    free = generate(model, params, PROMPTS, **kw)
    stop = free.tokens[1][2]
    streamed = [[] for _ in PROMPTS]

    def on_token(step, tokens, emitted):
        for b in np.flatnonzero(emitted):
            streamed[b].append(int(tokens[b]))

    looped = generate(model, params, PROMPTS, stop_tokens=[stop], **kw)
    called = generate(model, params, PROMPTS, stop_tokens=[stop], callback=on_token, **kw)
    assert called == looped
    assert streamed == looped.tokens
    assert looped.stopped[1]


def test_prompt_validation(llama):
    model, params = llama
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, params, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompts\[0\]\[1\]=512: is outside the vocabulary"):
        generate(model, params, [[1, 512]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)


def test_prompts_may_be_arrays_and_numpy_ints(llama):
    """Valid spellings of a batch (an int array, numpy ints, tuples) are the same request."""
    model, params = llama
    ref = generate(model, params, [[1, 5, 7], [1, 9, 4]], max_new_tokens=3)
    as_array = generate(model, params, np.asarray([[1, 5, 7], [1, 9, 4]]), max_new_tokens=3)
    as_scalars = generate(
        model, params, [tuple(np.int64([1, 5, 7])), (1, 9, 4)], max_new_tokens=np.int32(3)
    )
    assert as_array == ref and as_scalars == ref


def test_learned_positions_refuse_to_overflow():
    model = llmjax.build("gpt2-tiny")  # max_seq_len 128
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, model.abstract_params(), [[1] * 100], max_new_tokens=40)


@pytest.mark.slow
def test_pallas_attention_gives_the_same_tokens():
    """Equal-length prompts use the decode kernel; mixed lengths fall back (packed cache)."""
    xla = llmjax.build("mistral-tiny", init_std=0.3)
    pallas = llmjax.build(xla.config.replace(attention_impl="pallas"))
    params = xla.init(jax.random.key(2))
    for prompts in ([[1, 2, 3, 4], [1, 5, 6, 7]], [[1, 2, 3, 4], [1, 5]]):
        ref = generate(xla, params, prompts, max_new_tokens=20)
        out = generate(pallas, params, prompts, max_new_tokens=20)
        assert out.tokens == ref.tokens
        np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
