"""Cheap invariants of the transformer: sizes, causality, packing, caching, remat, dtypes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.config import ConfigError

TINY = ["gpt2-tiny", "llama3-tiny", "mistral-tiny", "qwen3-tiny", "gemma2-tiny", "gemma3-tiny"]

# Published parameter counts (embeddings included, tied heads counted once).
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "llama3.2-1b": 1_235_814_400,
    "llama3.1-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,  # the language model of gemma-3-4b (vision tower excluded)
}


def tokens_for(model, batch=2, length=24, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, model.config.vocab_size, (batch, length)), jnp.int32)


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model = llmjax.build(request.param)
    return model, model.init(jax.random.key(0))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_presets_have_published_parameter_counts(name):
    model = llmjax.build(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0))  # no memory is allocated
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert count == PUBLISHED[name]
    assert jax.tree.structure(shapes) == jax.tree.structure(model.abstract_params())


def test_every_parameter_has_logical_axes():
    for name in TINY + ["gemma3-4b"]:
        model = llmjax.build(name)
        shapes, names = model.abstract_params(), model.param_axes()
        assert jax.tree.structure(shapes) == jax.tree.structure(
            names, is_leaf=lambda x: isinstance(x, tuple)
        )
        for s, n in zip(
            jax.tree.leaves(shapes),
            jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)),
            strict=True,
        ):
            assert len(n) == len(s.shape) and all(isinstance(a, str) for a in n)


def test_causality(tiny):
    """Changing a later token never changes earlier logits."""
    model, params = tiny
    x = tokens_for(model)
    y = x.at[:, 15].set((x[:, 15] + 1) % model.config.vocab_size)
    a, b = model.apply(params, x), model.apply(params, y)
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert np.abs(a[:, 15:] - b[:, 15:]).max() > 0


def test_packed_segments_equal_separate_sequences(tiny):
    model, params = tiny
    x = tokens_for(model, batch=1, length=20)
    seg = jnp.asarray([[1] * 8 + [2] * 12], jnp.int32)
    pos = jnp.asarray([list(range(8)) + list(range(12))], jnp.int32)
    packed = model.apply(params, x, positions=pos, segment_ids=seg)
    first, second = model.apply(params, x[:, :8]), model.apply(params, x[:, 8:])
    np.testing.assert_allclose(packed[:, :8], first, atol=1e-5)
    np.testing.assert_allclose(packed[:, 8:], second, atol=1e-5)


def test_cache_decoding_token_by_token_equals_full_forward(tiny):
    """Prefill 5 tokens, then decode 1, 2 and 1 at a time up to 24 (> every sliding window)."""
    model, params = tiny
    x = tokens_for(model)
    full = model.apply(params, x)
    step = jax.jit(model.apply)
    cache = model.init_cache(2, 32)
    outs, t = [], 0
    for n in [5] + [1, 2, 1] * 4 + [1] * 3:
        logits, cache = step(params, x[:, t : t + n], cache=cache)
        outs.append(logits)
        t += n
    assert t == 24 and int(cache.length_B[0]) == 24
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def test_cache_with_right_padded_prompts(tiny):
    """Prompts of different lengths share one batch: reset lengths after prefill, then decode."""
    model, params = tiny
    x = tokens_for(model, batch=2, length=12)
    lengths = jnp.asarray([12, 7], jnp.int32)
    mask = (jnp.arange(12)[None] < lengths[:, None]).astype(jnp.int32)
    cache = model.init_cache(2, 16)
    _, cache = model.apply(params, x, attention_mask=mask, cache=cache)
    cache = cache.replace(length_B=lengths)
    nxt = tokens_for(model, batch=2, length=1, seed=3)
    logits, _ = model.apply(params, nxt, cache=cache)
    for b, n in enumerate([12, 7]):
        seq = jnp.concatenate([x[b : b + 1, :n], nxt[b : b + 1]], axis=1)
        np.testing.assert_allclose(logits[b, 0], model.apply(params, seq)[0, -1], atol=2e-5)


def test_logit_index_selects_rows_of_the_full_logits(tiny):
    """Unembedding only some tokens (a prefill's last one) gives exactly those rows."""
    model, params = tiny
    x = tokens_for(model, batch=2, length=12)
    full = model.apply(params, x)
    index = jnp.asarray([[11, 3], [0, 7]], jnp.int32)
    some = model.apply(params, x, logit_index=index)
    assert some.shape == (2, 2, model.config.vocab_size)
    np.testing.assert_allclose(
        some, jnp.take_along_axis(full, index[:, :, None], axis=1), atol=1e-5
    )
    with pytest.raises(ValueError, match="logit_index must be int"):
        model.apply(params, x, logit_index=jnp.zeros((3,), jnp.int32))


@pytest.mark.parametrize("policy", ["full", pytest.param("dots", marks=pytest.mark.slow)])
def test_remat_equals_no_remat(tiny, policy):
    model, params = tiny
    x = tokens_for(model)

    def loss(m, p):
        return jnp.mean(jax.nn.logsumexp(m.apply(p, x), axis=-1))

    plain = jax.value_and_grad(lambda p: loss(model, p))(params)
    remat = llmjax.build(model.config.replace(remat=policy))
    other = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(other[0], plain[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(other[1]), jax.tree.leaves(plain[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_forward_is_finite_and_close_to_fp32(tiny):
    model, params = tiny
    x = tokens_for(model)
    ref = model.apply(params, x)
    bf = llmjax.build(model.config.replace(param_dtype="bfloat16", dtype="bfloat16"))
    out = bf.apply(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), x)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    # bf16 keeps 8 bits of mantissa: errors of a few 1e-2 relative to the logit scale.
    assert float(jnp.abs(out - ref).max()) <= 0.05 * float(jnp.abs(ref).max()) + 0.05


def test_apply_composes_with_jit_grad_vmap():
    model = llmjax.build("llama3-tiny")
    params = jax.jit(model.init)(jax.random.key(1))
    x = tokens_for(model, batch=3, length=10)
    eager = model.apply(params, x)
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), eager, atol=1e-5)
    per_example = jax.vmap(lambda t: model.apply(params, t[None])[0])(x)
    np.testing.assert_allclose(per_example, eager, atol=1e-5)
    grads = jax.grad(lambda p: model.apply(p, x).mean())(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_bad_inputs_raise_clear_errors():
    model = llmjax.build("llama3-tiny")
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)"):
        model.apply(params, jnp.asarray([[1, 512]]))
    with pytest.raises(ValueError, match=r"int array \[batch, length\]"):
        model.apply(params, jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="KV cache overflow"):
        model.apply(params, jnp.ones((1, 5), jnp.int32), cache=model.init_cache(1, 4))
    with pytest.raises(ConfigError, match="n_kv_heads=3: must divide n_heads=4"):
        llmjax.build("llama3-tiny", n_kv_heads=3)
    with pytest.raises(ConfigError, match="unknown ModelConfig field.*'n_head'.*valid fields"):
        llmjax.build("llama3-tiny", n_head=3)
    with pytest.raises(ConfigError, match="sliding_window must be a positive int"):
        llmjax.build("llama3-tiny", layer_pattern=("local",))
    with pytest.raises(KeyError, match="unknown preset 'llama9'.*available presets"):
        llmjax.build("llama9")
    with pytest.raises(ValueError, match="beyond max_seq_len=128"):
        gpt = llmjax.build("gpt2-tiny")
        gpt.apply(gpt.init(jax.random.key(0)), jnp.ones((1, 129), jnp.int32))
