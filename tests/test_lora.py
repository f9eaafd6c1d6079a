"""LoRA in merged form: starts at the base, exact gradients, frozen (and quantized) base, configs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import ConfigError, InputError
from llmjax.inference.quantize import QuantizedTensor, dequantize, quantize
from llmjax.lora import (
    LoraConfig,
    LoraWeight,
    apply_lora,
    count_trainable,
    init_lora,
    lora_axes,
    lora_targets,
    merge,
    unmerge,
)

U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(scope="module")
def tiny():
    # One unrolled block per layer, so each layer's weight is read by its index; stacked
    # (scanned) adapters are checked against these in tests/test_scan.py.
    model = llmjax.build("llama3-tiny", scan_layers=False)
    return model, model.init(jax.random.key(0))


def _trained(adapters, seed=1, std=0.05):
    """Adapters with ``b`` drawn away from zero, as after some training."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _tokens(batch=2, length=12, vocab=512, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def test_adapters_start_at_the_base_exactly(tiny):
    model, params = tiny
    cfg = LoraConfig()
    adapters = init_lora(model, cfg, jax.random.key(1))
    x = _tokens()
    assert np.array_equal(model.apply(apply_lora(params, adapters, cfg), x), model.apply(params, x))
    # The layout: a [I..., R] uniform in +-1/sqrt(fan_in), b [R, O...] zero, float32.
    wo = adapters["layers"][1]["attn"]["wo"]
    H, C, D = params["layers"][1]["attn"]["wo"].shape
    assert wo["a"].shape == (H, C, 8) and wo["b"].shape == (8, D)
    assert wo["a"].dtype == jnp.float32 and not wo["b"].any()
    assert 0.9 / math.sqrt(H * C) < float(jnp.abs(wo["a"]).max()) <= 1 / math.sqrt(H * C)
    n = model.config.n_layers * 7
    assert len(lora_targets(model, cfg)) == n == len(jax.tree.leaves(adapters)) // 2


def test_axes_and_trainable_count(tiny):
    model, _ = tiny
    cfg = LoraConfig(rank=4, targets=r"layers\.\d+\.attn\.(wq|wo)")
    adapters = init_lora(model, cfg, jax.random.key(0))
    axes = lora_axes(model, cfg)
    assert axes["layers"][0]["attn"]["wq"] == {
        "a": ("embed", None),
        "b": (None, "heads", "head_dim"),
    }
    assert axes["layers"][0]["attn"]["wo"] == {
        "a": ("heads", "head_dim", None),
        "b": (None, "embed"),
    }
    cfg_ = model.config
    D, HC = cfg_.d_model, cfg_.n_heads * cfg_.resolved_head_dim
    per_layer = 4 * (D + HC) + 4 * (HC + D)
    count = count_trainable(model, adapters)
    assert count.trainable == cfg_.n_layers * per_layer
    assert count.total == model.num_params() + count.trainable
    assert 0 < count.fraction < 0.1


def test_scale_and_rslora():
    assert LoraConfig(rank=8, alpha=16.0).scale == 2.0
    assert LoraConfig(rank=16, alpha=16.0, rslora=True).scale == 4.0


def test_merge_unmerge_round_trip(tiny):
    model, params = tiny
    cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = _trained(init_lora(model, cfg, jax.random.key(2)))
    merged = merge(params, adapters, cfg)
    back = unmerge(merged, adapters, cfg)
    applied = apply_lora(params, adapters, cfg)
    adapted = set(lora_targets(model, cfg))
    is_lw = lambda x: isinstance(x, LoraWeight)
    flat = lambda t: {
        jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t, is_leaf=is_lw)
    }
    p, m, b, a = (flat(t) for t in (params, merged, back, applied))
    for key, w in p.items():
        assert np.array_equal(m[key], a[key][...]), key  # merge is what a LoraWeight reads as
        dotted = ".".join(k.strip("[]'") for k in key.split("]["))
        if dotted not in adapted:
            assert np.array_equal(m[key], w) and np.array_equal(b[key], w), key
            continue
        change = np.abs(np.asarray(m[key]) - np.asarray(w))
        assert change.max() > 1e-3, key  # the adapter matters
        # Two float32 roundings: |back - w| <= 2u (|w| + |delta|) elementwise.
        bound = 2 * U * (np.abs(np.asarray(w)) + 2 * change)
        assert (np.abs(np.asarray(b[key]) - np.asarray(w)) <= bound).all(), key


def _sum_loss(model, tokens, weights):
    return lambda params: jnp.sum(model.apply(params, tokens) * weights)


def test_gradients_are_lora_gradients_and_base_is_frozen(tiny):
    """d/da = s * dL/dW . b^T and d/db = s * a^T . dL/dW, with dL/dW the full fine-tuning gradient."""
    model, params = tiny
    cfg = LoraConfig(rank=4, alpha=12.0, targets=r"layers\.(0\.attn\.wo|1\.mlp\.up)")
    adapters = _trained(init_lora(model, cfg, jax.random.key(3)))
    x = _tokens()
    weights = jax.random.normal(jax.random.key(4), (2, 12, 512))
    loss = _sum_loss(model, x, weights)
    g_base, g_ad = jax.grad(lambda p, a: loss(apply_lora(p, a, cfg)), argnums=(0, 1))(
        params, adapters
    )
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(g_base))  # frozen
    g_full = jax.grad(loss)(merge(params, adapters, cfg))
    s = cfg.scale
    for path in (("layers", 0, "attn", "wo"), ("layers", 1, "mlp", "up")):
        get = lambda t, path=path: t[path[0]][path[1]][path[2]][path[3]]
        a, b, gW = get(adapters)["a"], get(adapters)["b"], get(g_full)
        rank, n_in = a.shape[-1], a.ndim - 1
        gW2 = np.asarray(gW, np.float64).reshape(math.prod(a.shape[:-1]), -1)
        a2 = np.asarray(a, np.float64).reshape(-1, rank)
        b2 = np.asarray(b, np.float64).reshape(rank, -1)
        want_a = (s * gW2 @ b2.T).reshape(a.shape)
        want_b = (s * a2.T @ gW2).reshape(b.shape)
        for got, want in ((get(g_ad)["a"], want_a), (get(g_ad)["b"], want_b)):
            got = np.asarray(got, np.float64)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (path, n_in)


def test_projection_matches_unmerged_reference_on_one_projection(tiny):
    """The layer's product with a ``LoraWeight`` against the hand-written x W + s (x A) B,
    forward and gradients."""
    model, params = tiny
    cfg = LoraConfig(rank=4, alpha=8.0, targets=r"layers\.0\.mlp\.up")
    adapters = _trained(init_lora(model, cfg, jax.random.key(5)))
    x_BTD = jax.random.normal(jax.random.key(6), (2, 5, model.config.d_model))
    g_BTF = jax.random.normal(jax.random.key(7), (2, 5, model.config.resolved_mlp_dim))
    W_DF = params["layers"][0]["mlp"]["up"]
    hi = jax.lax.Precision.HIGHEST

    def merged(ad):
        W = apply_lora(params, ad, cfg)["layers"][0]["mlp"]["up"]
        assert isinstance(W, LoraWeight)
        return jnp.sum(g_BTF * W.project("BTD,DF->BTF", x_BTD, jnp.float32))

    def reference(ad):
        a_DR, b_RF = ad["layers"][0]["mlp"]["up"]["a"], ad["layers"][0]["mlp"]["up"]["b"]
        y = jnp.einsum("BTD,DF->BTF", x_BTD, W_DF, precision=hi)
        y += cfg.scale * jnp.einsum("BTD,DR,RF->BTF", x_BTD, a_DR, b_RF, precision=hi)
        return jnp.sum(g_BTF * y)

    assert abs(merged(adapters) - reference(adapters)) <= 1e-5 * abs(reference(adapters))
    got, want = jax.grad(merged)(adapters), jax.grad(reference)(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()
    # At initialisation (b = 0) only b receives a gradient, as in LoRA.
    fresh = jax.grad(merged)(init_lora(model, cfg, jax.random.key(5)))
    assert not fresh["layers"][0]["mlp"]["up"]["a"].any()
    assert fresh["layers"][0]["mlp"]["up"]["b"].any()


@pytest.mark.parametrize("mode,group", [("nf4", 32), ("int8", 64)])
def test_quantized_base_is_dequantized_then_adapted(tiny, mode, group):
    model, params = tiny
    cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = _trained(init_lora(model, cfg, jax.random.key(8)))
    q = quantize(model, params, mode, group)
    on_q, on_deq = apply_lora(q, adapters, cfg), apply_lora(dequantize(q), adapters, cfg)
    weight = lambda x: isinstance(x, LoraWeight | QuantizedTensor)
    read = lambda t: [w[...] if weight(w) else w for w in jax.tree.leaves(t, is_leaf=weight)]
    for u, v in zip(read(on_q), read(on_deq), strict=True):
        assert np.array_equal(u, v)
    x = _tokens()
    # Eager, op by op: under jit XLA may fuse the dequantization with the sum (an FMA), which
    # rounds differently from the same ops apart.
    step = jax.value_and_grad(lambda a, base: jnp.mean(model.apply(apply_lora(base, a, cfg), x)))
    (l_q, g_q), (l_d, g_d) = step(adapters, q), step(adapters, dequantize(q))
    assert l_q == l_d
    for u, v in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_d), strict=True):
        assert np.array_equal(u, v)


def test_bf16_base_adds_in_float32_and_casts_back():
    model = llmjax.build("llama3-tiny", param_dtype="bfloat16", dtype="bfloat16", scan_layers=False)
    params = model.init(jax.random.key(0))
    cfg = LoraConfig(rank=2, targets=r"layers\.0\.mlp\.down")
    adapters = _trained(init_lora(model, cfg, jax.random.key(1)))
    out = apply_lora(params, adapters, cfg)["layers"][0]["mlp"]["down"]
    w = params["layers"][0]["mlp"]["down"]
    a, b = adapters["layers"][0]["mlp"]["down"]["a"], adapters["layers"][0]["mlp"]["down"]["b"]
    want = (w.astype(jnp.float32) + cfg.scale * (a @ b)).astype(jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and np.array_equal(out[...], want)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "rank=0: must be a positive int"),
        ({"rank": 2.5}, "rank=2.5"),
        ({"alpha": -1.0}, "alpha=-1.0: must be a positive number"),
        ({"alpha": float("inf")}, "must be finite"),
        ({"rslora": "yes"}, "rslora='yes'"),
        ({"targets": "layers.(0"}, "not a valid regex"),
    ],
)
def test_bad_config_fields_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_targets_that_select_nothing_or_non_linear_weights_are_refused(tiny):
    model, _ = tiny
    with pytest.raises(ConfigError, match=r"selects no parameter.*layers\.N\.attn\.wq.*lm_head"):
        lora_targets(model, LoraConfig(targets=r"layers\.9\.attn\.wq"))
    with pytest.raises(ConfigError, match=r"selects embed, layers\.N\.attn_norm\.scale, which"):
        init_lora(
            model, LoraConfig(targets=r"embed|layers\.\d\.attn_norm\.scale"), jax.random.key(0)
        )
    # lm_head is a linear projection (untied): allowed when asked for.
    assert lora_targets(model, LoraConfig(targets="lm_head")) == ("lm_head",)


def test_mismatched_adapters_are_refused(tiny):
    model, params = tiny
    cfg = LoraConfig(rank=4)
    adapters = init_lora(model, cfg, jax.random.key(0))
    with pytest.raises(InputError, match="rank 4 .* rank=8"):
        apply_lora(params, adapters, LoraConfig(rank=8))
    other = llmjax.build("llama3-tiny", d_model=32, n_heads=2, scan_layers=False)
    with pytest.raises(InputError, match="does not fit its weight"):
        apply_lora(other.init(jax.random.key(0)), adapters, cfg)
    with pytest.raises(InputError, match="not an adapter tree"):
        apply_lora(params, {"layers": {0: {"attn": {"wq": {"a": 1.0}}}}}, cfg)
    with pytest.raises(InputError, match="which params do not hold"):
        apply_lora(params, {"nope": adapters["layers"][0]["attn"]["wq"]}, cfg)


def test_dropout_acts_on_the_adapter_input_in_training_only(tiny):
    """PEFT's lora_dropout: x . W + s (dropout(x) . a) . b, with a key; none without one."""
    model, params = tiny
    cfg = LoraConfig(rank=4, alpha=8.0, targets=r"layers\.0\.mlp\.up", dropout=0.25)
    adapters = _trained(init_lora(model, cfg, jax.random.key(11)))
    x_BTD = jax.random.normal(jax.random.key(12), (2, 5, model.config.d_model))
    W = params["layers"][0]["mlp"]["up"]
    ad = adapters["layers"][0]["mlp"]["up"]
    plain = apply_lora(params, adapters, cfg)["layers"][0]["mlp"]["up"]
    assert plain.key is None
    want = x_BTD @ W + cfg.scale * (x_BTD @ ad["a"]) @ ad["b"]
    got = plain.project("BTD,DF->BTF", x_BTD, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    noisy = apply_lora(params, adapters, cfg, key=jax.random.key(13))["layers"][0]["mlp"]["up"]
    keep = jax.random.bernoulli(noisy.key, 0.75, x_BTD.shape)
    dropped = jnp.where(keep, x_BTD / 0.75, 0.0)
    want = x_BTD @ W + cfg.scale * (dropped @ ad["a"]) @ ad["b"]
    got = noisy.project("BTD,DF->BTF", x_BTD, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, plain.project("BTD,DF->BTF", x_BTD, jnp.float32))
    with pytest.raises(ConfigError, match="dropout=1.0"):
        LoraConfig(dropout=1.0)
