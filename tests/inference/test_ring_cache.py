"""Ring-buffer KV caches of sliding-window layers: the full cache's outputs in O(window) memory."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import InputError
from llmjax.inference import SamplingConfig, generate, rollout
from llmjax.inference.sampler import pad_prompts
from llmjax.inference.speculative import speculative_generate
from llmjax.layers import attend
from tests.inference.conftest import step_logits

W = 8  # the sliding window of every model here; prompts and generations run well past it
MAX_LEN = 64


def build(name, **overrides):
    model = llmjax.build(name, sliding_window=W, **overrides)
    return model, model.init(jax.random.key(0))


@functools.cache
def built(name):
    return build(name)


@pytest.fixture(params=["mistral-tiny", "gemma2-tiny"])
def windowed(request):
    """Every layer local (Mistral); local and global layers alternating (Gemma 2)."""
    return built(request.param)


@functools.cache
def jitted(model):
    return jax.jit(model.apply)


def tokens(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, 512, jnp.int32)


def decode(model, params, calls, *, ring=True, rollback=0, batch=2):
    """Feed ``calls`` (``(tokens, kwargs, lengths after the call or None)``) to one cache."""
    step = jitted(model)
    cache = model.init_cache(batch, MAX_LEN, ring=ring, rollback=rollback)
    outs = []
    for x, kwargs, lengths in calls:
        logits, cache = step(params, x, cache=cache, **kwargs)
        outs.append(np.asarray(logits))
        if lengths is not None:
            cache = cache.replace(length_B=jnp.asarray(lengths, jnp.int32))
    return outs, cache


def assert_ring_equals_full(model, params, calls, real=None, **kw):
    """Equal logits (at real tokens) from the ring cache and from the full cache."""
    ring, cache = decode(model, params, calls, **kw)
    full, _ = decode(model, params, calls, ring=False, **kw)
    assert cache.ring_len is not None
    for i, (a, b) in enumerate(zip(ring, full, strict=True)):
        keep = real[i] if real and i < len(real) else np.ones(a.shape[:2], bool)
        np.testing.assert_allclose(a[keep], b[keep], atol=1e-5, err_msg=f"call {i}")
    return ring, full


@pytest.mark.parametrize("name", ["mistral-tiny", "gemma2-tiny", "gemma3-tiny"])
def test_prefill_past_the_window_then_decode_3w_tokens(name):
    """A prefill of 20 > W tokens, a chunk of 3, then 3W one-token steps: the ring cache gives
    the full cache's logits, and both give the uncached forward's. Gemma 3: 5 local : 1 global."""
    model, params = built(name)
    x = tokens((2, 20 + 3 + 3 * W))
    sizes, calls, t = [20, 3] + [1] * (3 * W), [], 0
    for n in sizes:
        calls.append((x[:, t : t + n], {}, None))
        t += n
    ring, _ = assert_ring_equals_full(model, params, calls)
    np.testing.assert_allclose(np.concatenate(ring, axis=1), model.apply(params, x), atol=2e-5)


def test_batch_of_right_padded_prompts_of_different_lengths(windowed):
    """generate's layout: one masked prefill, lengths reset to each prompt's, 3W decode steps."""
    model, params = windowed
    lengths, L = np.asarray([20, 11, 3]), 20
    x = tokens((3, L + 3 * W), seed=1)
    mask = np.arange(L)[None] < lengths[:, None]
    calls = [(x[:, :L], {"attention_mask": mask}, lengths)]
    for i in range(3 * W):
        calls.append((x[np.arange(3), lengths + i][:, None], {}, None))
    ring, _ = assert_ring_equals_full(model, params, calls, real=[mask], batch=3)
    b = 1  # and one row against its own uncached forward
    seq = jnp.concatenate([x[b, : lengths[b]], jnp.stack([c[0][b, 0] for c in calls[1:]])])
    ref = model.apply(params, seq[None])[0, lengths[b] :]
    np.testing.assert_allclose(np.stack([r[b, 0] for r in ring[1:]]), ref, atol=2e-5)


def test_left_padding_and_packed_segments(windowed):
    """Left padding (positions offset) in one row, two packed documents in the other."""
    model, params = windowed
    x = tokens((2, 22 + 2 * W), seed=2)
    seg = np.asarray([[0] * 5 + [1] * 17, [1] * 12 + [2] * 10])
    pos = np.asarray([[0] * 5 + list(range(17)), list(range(12)) + list(range(10))])
    calls = [(x[:, :22], {"segment_ids": seg, "positions": pos}, None)]
    for i in range(2 * W):  # each row continues its last document
        kw = {"segment_ids": np.asarray([[1], [2]]), "positions": np.asarray([[17 + i], [10 + i]])}
        calls.append((x[:, 22 + i : 23 + i], kw, None))
    assert_ring_equals_full(model, params, calls, real=[seg > 0])


def test_rollback_within_the_slack_equals_the_full_cache_and_beyond_it_is_refused():
    """Speculative decoding's pattern: write 4 drafts, keep 1 or 3 of them, continue. With
    ``rollback=3`` the ring keeps every key still in the window; without it keys are lost, the
    eager call refuses, and a jitted one (which cannot check) gives other logits."""
    model, params = built("mistral-tiny")
    x = tokens((2, 40), seed=3)
    calls = [
        (x[:, :20], {}, None),
        (x[:, 20:24], {}, [21, 23]),  # drop 3 and 1 of the 4 drafts
        (x[:, 24:28], {}, None),
        *[(x[:, t : t + 1], {}, None) for t in range(28, 40)],
    ]
    _, full = assert_ring_equals_full(model, params, calls, rollback=3)

    short, cache = decode(model, params, calls[:2])  # rollback=0: the ring holds W entries
    with pytest.raises(InputError, match=r"length_B\[0\]=21 is 3 below.*rollback=3"):
        model.apply(params, x[:, 24:28], cache=cache)
    short, _ = decode(model, params, calls)  # jitted: cannot check, and gets another answer
    assert np.abs(short[2] - full[2]).max() > 1e-4


@pytest.mark.slow  # about 70 s on one CPU core
def test_speculative_decoding_past_the_window_equals_greedy_decoding():
    """Each verify writes k + 1 = 4 tokens and keeps 1 to 4 of them (the rolled-back caches)."""
    target, tp = build("mistral-tiny", init_std=0.3)
    noise = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), a.shape), tp)
    dp = jax.tree.map(lambda a, n: a + 0.01 * n, tp, noise)  # a draft that is often right
    prompts = [list(range(1, 14)), [1, 90, 5, 6, 8, 2, 7, 7, 300], [1, 90]]
    ref = generate(target, tp, prompts, max_new_tokens=3 * W)
    out = speculative_generate(target, tp, target, dp, prompts, max_new_tokens=3 * W, num_draft=3)
    assert out.tokens == ref.tokens
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    assert 0.2 < out.acceptance_rate < 0.8  # drafts accepted and rejected
    for prompt, toks in zip(prompts, ref.tokens, strict=True):
        logits = step_logits(target, tp, prompt, toks)
        chosen = logits[np.arange(len(toks)), toks]
        np.testing.assert_array_less(logits.max(-1) - chosen, 1e-4)  # greedy: the argmax


def test_rollout_under_jit_decodes_past_the_window():
    """The training-time sampler, jitted whole, with prompts longer than the window."""
    model, params = build("gemma2-tiny", init_std=0.3)
    prompts = [list(range(1, 14)), [1, 90, 5]]
    tokens_BL, lengths_B = pad_prompts(prompts, 512)
    run = jax.jit(
        lambda p, t, n, k: rollout(model, p, t, n, k, max_new=2 * W, sampling=SamplingConfig())
    )
    r = run(params, jnp.asarray(tokens_BL), jnp.asarray(lengths_B), jax.random.key(0))
    for b, prompt in enumerate(prompts):
        toks = np.asarray(r.tokens_BN[b]).tolist()
        logits = step_logits(model, params, prompt, toks)
        chosen = logits[np.arange(len(toks)), toks]
        np.testing.assert_array_less(logits.max(-1) - chosen, 1e-4)


def test_local_layers_hold_o_window_bytes():
    """Mistral-shaped (every layer local) and Gemma-shaped (mixed) caches, window 8, 64 slots."""
    model = llmjax.build("mistral-tiny", sliding_window=W)
    cfg = model.config
    K, C, B = cfg.resolved_kv_heads, cfg.resolved_head_dim, 2
    ring, full = model.init_cache(B, MAX_LEN), model.init_cache(B, MAX_LEN, ring=False)
    assert ring.ring_len == W and full.ring_len is None
    assert all(k.shape == (B, K, W, C) for k in ring.k + ring.v)
    assert all(k.shape == (B, K, MAX_LEN, C) for k in full.k + full.v)
    kv = lambda S: 2 * cfg.n_layers * B * K * S * C * 4  # float32 keys and values
    book = B * MAX_LEN * 4 + B * 4  # seg_BS and length_B
    assert full.nbytes == kv(MAX_LEN) + book
    assert ring.nbytes == kv(W) + book + 2 * B * W * 4  # + each entry's slot and segment id
    # O(window): the keys and values do not grow with max_len (shapes only, nothing allocated).
    long = jax.eval_shape(lambda: model.init_cache(B, 1 << 20))
    assert all(k.shape == (B, K, W, C) for k in long.k + long.v)
    # Speculative decoding's slack; no ring where it would not be smaller than max_len.
    assert model.init_cache(B, MAX_LEN, rollback=4).k[0].shape[2] == W + 4
    assert model.init_cache(B, W + 4, rollback=4).ring_len is None

    gemma = llmjax.build("gemma2-tiny", sliding_window=W)  # local, global
    shapes = [k.shape[2] for k in gemma.init_cache(B, MAX_LEN).k]
    assert shapes == [W, MAX_LEN]


def test_pallas_models_read_rings_with_xla_and_say_so(caplog):
    xla, params = built("mistral-tiny")
    pallas = llmjax.build(xla.config.replace(attention_impl="pallas"))
    x = tokens((2, 20))
    attend._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=attend.__name__):
        a, _ = jitted(pallas)(params, x, cache=pallas.init_cache(2, MAX_LEN))
    assert "ring-buffer KV cache use XLA attention" in caplog.text
    b, _ = jitted(xla)(params, x, cache=xla.init_cache(2, MAX_LEN))
    np.testing.assert_array_equal(a, b)


def test_bad_caches_and_arguments_raise_clear_errors():
    model, params = built("gemma2-tiny")
    x = tokens((2, 3))
    with pytest.raises(InputError, match="rollback must be an int >= 0"):
        model.init_cache(2, MAX_LEN, rollback=-1)
    llama = llmjax.build("llama3-tiny")
    with pytest.raises(InputError, match="ring buffers for sliding-window layers but"):
        llama.apply(llama.init(jax.random.key(0)), x, cache=model.init_cache(2, MAX_LEN))
    narrow = llmjax.build("gemma2-tiny", sliding_window=4).init_cache(2, MAX_LEN)
    with pytest.raises(InputError, match="hold 4 entries, fewer than the sliding window 8"):
        model.apply(params, x, cache=narrow)
    with pytest.raises(
        InputError, match=r"\[2, 1, 8, 32\], expected \[2, 2, 8, 32\] \[batch, kv_heads, ring"
    ):
        other = llmjax.build("gemma2-tiny", sliding_window=W, n_kv_heads=1)
        model.apply(params, x, cache=other.init_cache(2, MAX_LEN))
    with pytest.raises(InputError, match=r"cache.ring_seg_BR has shape \[2, 9\]"):
        cache = model.init_cache(2, MAX_LEN)
        model.apply(params, x, cache=cache.replace(ring_seg_BR=jnp.zeros((2, 9), jnp.int32)))
    with pytest.raises(InputError, match="KV cache overflow"):
        model.apply(params, tokens((2, MAX_LEN + 1)), cache=model.init_cache(2, MAX_LEN))
