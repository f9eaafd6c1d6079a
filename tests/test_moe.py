"""Mixture of experts: HF parity for Mixtral, Qwen3-MoE and Qwen2-MoE, dispatch against a per-token
reference,
router invariants, the balancing loss against transformers', gradients, presets and model invariants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
from llmjax.config import ConfigError, ModelConfig
from llmjax.interop.hf_config import UnsupportedConfig, config_from_hf
from llmjax.layers.moe import MoE, aux_losses, route, router_stats
from llmjax.losses import next_token_loss
from tests import test_model
from tests.hf_util import build_hf, hf_logits, random_tokens, torch, transformers

TOL = 1e-4

VARIANTS = [
    # family, HF config overrides, whether transformers writes its fused in-memory expert layout;
    # together they vary E, k, norm_topk_prob, sparse steps, dense layers, sliding windows and
    # (Qwen2-MoE) q/k/v biases beside the gated shared expert.
    ("mixtral", {}, False),
    ("mixtral", {"num_local_experts": 5, "num_experts_per_tok": 3, "sliding_window": 4}, True),
    ("qwen3_moe", {}, False),  # norm_topk_prob=False, transformers' default
    (
        "qwen3_moe",
        {
            "norm_topk_prob": True,
            "num_experts": 8,
            "num_experts_per_tok": 1,
            "decoder_sparse_step": 2,
        },
        False,
    ),
    (
        "qwen3_moe",
        {
            "mlp_only_layers": [1],
            "norm_topk_prob": True,
            "use_sliding_window": True,
            "sliding_window": 4,
        },
        True,
    ),
    ("qwen2_moe", {}, False),  # norm_topk_prob=False, q/k/v biases: Qwen1.5-MoE's choices
    (
        "qwen2_moe",
        {
            "norm_topk_prob": True,
            "num_experts": 8,
            "num_experts_per_tok": 3,
            "decoder_sparse_step": 2,
        },
        True,
    ),
    (
        "qwen2_moe",
        {  # windows on layers 0 and 2 (transformers' rule), layer 0 dense
            "mlp_only_layers": [0],
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 3,
            "qkv_bias": False,
        },
        False,
    ),
]


def _ids(v):
    fam, kw, fused = v
    return fam + ("-" + "-".join(sorted(kw)) if kw else "") + ("-fused" if fused else "")


@pytest.mark.parametrize("family,overrides,fused", VARIANTS, ids=[_ids(v) for v in VARIANTS])
def test_logits_match_transformers(tmp_path, family, overrides, fused):
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path, save_original_format=not fused)
    model, params = llmjax.from_hf(tmp_path)
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert model.config.n_experts == getattr(hf.config, key)
    tokens = random_tokens(2, 13)
    logits = jax.jit(model.apply)(params, tokens)
    diff = np.abs(np.asarray(logits) - hf_logits(hf, tokens)).max()
    assert diff <= TOL, f"max abs logit diff {diff}"


def test_padded_batch_logits_and_balancing_loss_match_transformers(tmp_path):
    """Left padding: equal logits at real tokens, and transformers' aux_loss over real tokens."""
    hf = build_hf("qwen3_moe", decoder_sparse_step=2, norm_topk_prob=True)
    hf.save_pretrained(tmp_path)
    model, params = llmjax.from_hf(tmp_path)
    tokens = random_tokens(3, 11, seed=1)
    lengths = np.array([11, 7, 4])
    mask = (np.arange(11)[None, :] >= 11 - lengths[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    with torch.no_grad():
        ref = hf(
            torch.as_tensor(tokens),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
            output_router_logits=True,
        )
    apply = jax.jit(
        lambda p, t, pos, m: model.apply(p, t, positions=pos, attention_mask=m, return_aux=True)
    )
    out, aux = apply(params, tokens, positions, mask)
    real = mask.astype(bool)
    assert np.abs(np.asarray(out)[real] - ref.logits.numpy()[real]).max() <= TOL
    np.testing.assert_allclose(float(aux["balance_loss"]), float(ref.aux_loss), rtol=1e-5)


@pytest.mark.parametrize("preset", ["mixtral-tiny", "qwen3-moe-tiny", "qwen2-moe-tiny"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, preset):
    model = llmjax.build(preset, init_std=0.2)  # weights large enough for routing to matter
    params = model.init(jax.random.key(3))
    llmjax.to_hf(model, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = random_tokens(2, 12, vocab=model.config.vocab_size)
    logits = jax.jit(model.apply)(params, tokens)
    diff = np.abs(np.asarray(logits) - hf_logits(hf, tokens)).max()
    assert diff <= TOL, f"max abs logit diff {diff}"
    back, again = llmjax.from_hf(tmp_path)
    assert back.config.dense_layers == model.config.dense_layers
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_configs_transformers_cannot_express_are_refused(tmp_path):
    mixtral = llmjax.build("mixtral-tiny", dense_layers=(0,))
    with pytest.raises(UnsupportedConfig, match="dense_layers"):
        llmjax.to_hf(mixtral, mixtral.abstract_params(), tmp_path)
    sigmoid = llmjax.build("qwen3-moe-tiny", router="sigmoid")
    with pytest.raises(UnsupportedConfig, match="router"):
        llmjax.to_hf(sigmoid, sigmoid.abstract_params(), tmp_path)
    ungated = llmjax.build("qwen2-moe-tiny", shared_expert_gate=False)
    with pytest.raises(UnsupportedConfig, match="shared_expert_gate"):
        llmjax.to_hf(ungated, ungated.abstract_params(), tmp_path)
    assert not any(tmp_path.iterdir())


def test_qwen2_moe_windows_without_layer_types_follow_transformers():
    """Configs written before ``layer_types`` existed: the windowed layers transformers derives."""
    hf = transformers.Qwen2MoeConfig(
        num_hidden_layers=7, use_sliding_window=True, sliding_window=4, max_window_layers=5
    ).to_dict()
    kinds = [
        {"sliding_attention": "local", "full_attention": "global"}[t] for t in hf["layer_types"]
    ]
    assert "local" in kinds and "global" in kinds
    del hf["layer_types"]
    hf["architectures"] = ["Qwen2MoeForCausalLM"]
    assert list(config_from_hf(hf).layer_kinds) == kinds
    hf["use_sliding_window"] = False  # transformers then sets the window to 0: no layer has one
    assert set(config_from_hf(hf).layer_kinds) == {"global"}


# The layer against a per-token reference ------------------------------------------------------
def _layer(seed=0, **kw):
    base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, init_std=0.5)
    base.update(n_experts=8, experts_per_token=2, expert_mlp_dim=24)
    return MoE(ModelConfig(**{**base, **kw}), rngs=nnx.Rngs(seed))


def _reference(layer, x_ND, keep=None):
    """Each token through its k experts, one at a time (numpy, float64)."""
    w = {
        n: np.asarray(getattr(layer, n)[...], np.float64) for n in ("router", "gate", "up", "down")
    }
    out = np.zeros_like(x_ND, dtype=np.float64)
    for n, x in enumerate(np.asarray(x_ND, np.float64)):
        logits = x @ w["router"]
        if layer.kind == "softmax":
            scores = np.exp(logits - logits.max())
            scores /= scores.sum()
        else:
            scores = 1 / (1 + np.exp(-logits))
        chosen = np.argsort(-scores, kind="stable")[: layer.k]  # ties: the lower index
        weights = scores[chosen] / (scores[chosen].sum() if layer.norm_topk else 1.0)
        for r, (e, g) in enumerate(zip(chosen, weights, strict=True)):
            if keep is not None and not keep[n, r]:
                continue
            gate = x @ w["gate"][e]
            h = gate / (1 + np.exp(-gate)) * (x @ w["up"][e])
            out[n] += g * (h @ w["down"][e])
    return out


def _inputs(layer, n=12, seed=0):
    x = np.random.default_rng(seed).normal(size=(1, n, 16)).astype(np.float32)
    x[..., 0] = 3.0  # a constant feature the router can key on
    router = np.asarray(layer.router[...]).copy()
    router[:, 2] = router[:, 1]  # experts 1 and 2 tie for every token
    router[:, 7] = 0.0
    router[0, 7] = -50.0  # expert 7 never wins: no token reaches it
    layer.router[...] = jnp.asarray(router)
    return jnp.asarray(x)


@pytest.mark.parametrize(
    "kw",
    [{}, {"experts_per_token": 3, "router_norm_topk": False}, {"router": "sigmoid"}],
    ids=["softmax-norm", "softmax-k3", "sigmoid"],
)
def test_dropless_dispatch_equals_per_token_reference(kw):
    layer = _layer(**kw)
    x = _inputs(layer)
    out, stats = nnx.jit(lambda m, x: m(x, jnp.ones(x.shape[:2], bool)))(layer, x)
    assert float(stats["load"][7]) == 0 and float(stats["load"].sum()) == 12 * layer.k
    ref = _reference(layer, x[0])
    np.testing.assert_allclose(np.asarray(out[0]), ref, atol=1e-5, rtol=1e-5)


def test_capacity_dispatch_drops_assignments_past_capacity_in_token_order():
    generous = _layer(moe_dispatch="capacity", capacity_factor=8.0)
    x = _inputs(generous)
    dropless = _layer()
    _inputs(dropless)
    call = nnx.jit(lambda m, x: m(x, jnp.ones(x.shape[:2], bool))[0])
    np.testing.assert_allclose(call(generous, x), call(dropless, x), atol=1e-5, rtol=1e-5)

    tight = _layer(moe_dispatch="capacity", capacity_factor=0.5)  # 2 slots per expert
    _inputs(tight)
    _, experts_NR, _ = route(x[0] @ tight.router[...], tight.k)
    seen, keep = {}, np.zeros(experts_NR.shape, bool)
    for n, r in np.ndindex(*experts_NR.shape):  # first come, first served
        e = int(experts_NR[n, r])
        keep[n, r] = seen.get(e, 0) < 2
        seen[e] = seen.get(e, 0) + 1
    assert not keep.all()
    out = call(tight, x)
    np.testing.assert_allclose(np.asarray(out[0]), _reference(tight, x[0], keep), atol=1e-5)


def test_router_invariants():
    logits = jax.random.normal(jax.random.key(0), (64, 8)) * 3
    for kind in ("softmax", "sigmoid"):
        for norm in (True, False):
            weights, experts, probs = route(logits, 3, kind, norm)
            assert weights.shape == experts.shape == (64, 3)
            np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
            # Three distinct experts per token, in decreasing weight.
            assert all(len(set(row)) == 3 for row in np.asarray(experts).tolist())
            assert bool(jnp.all(weights[:, :-1] >= weights[:, 1:]))
            if norm:
                np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
            elif kind == "softmax":
                np.testing.assert_allclose(
                    weights, jnp.take_along_axis(probs, experts, -1), rtol=1e-6
                )
    _, experts, probs = route(logits, 3)
    stats = router_stats(logits, experts, probs, jnp.ones(64, bool))
    assert float(stats["load"].sum()) == 64 * 3 and float(stats["tokens"]) == 64


def test_balancing_loss_equals_transformers_function():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(2 * 9, 6)).astype(np.float32) * 2 for _ in range(3)]
    mask = (rng.random((2, 9)) > 0.3).astype(np.int64)
    for m in (None, mask):
        ref = load_balancing_loss_func(
            tuple(torch.as_tensor(g) for g in layers),
            6,
            2,
            None if m is None else torch.as_tensor(m),
        )
        total = None
        for g in layers:
            _, experts, probs = route(jnp.asarray(g), 2)
            real = jnp.ones(18, bool) if m is None else jnp.asarray(m.reshape(-1), bool)
            s = router_stats(jnp.asarray(g), experts, probs, real)
            total = s if total is None else jax.tree.map(jnp.add, total, s)
        ours = aux_losses(total, 6)
        np.testing.assert_allclose(float(ours["balance_loss"]), float(ref), rtol=1e-5)


def test_balancing_loss_is_switch_formula_and_z_loss_its_definition():
    """Top-1: E * sum_e f_e P_e, f_e the fraction of tokens sent to e, P_e its mean probability."""
    logits = np.random.default_rng(1).normal(size=(40, 4)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.bincount(p.argmax(-1), minlength=4) / 40
    _, experts, probs = route(jnp.asarray(logits), 1)
    out = aux_losses(router_stats(jnp.asarray(logits), experts, probs, jnp.ones(40, bool)), 4)
    np.testing.assert_allclose(float(out["balance_loss"]), 4 * np.sum(f * p.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(out["router_z_loss"]), np.mean(lse**2), rtol=1e-5)


# The model ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    """Both kinds of layer (routed and dense); Mixtral's blocks run the same code."""
    model = llmjax.build("qwen3-moe-tiny", init_std=0.1)
    return model, model.init(jax.random.key(0))


def test_loss_adds_aux_losses_gradients_reach_router_and_experts_remat_equal(tiny):
    model, params = tiny
    model = llmjax.build(model.config.replace(router_z_coef=1e-3))
    remat = llmjax.build(model.config.replace(remat="full"))
    tokens = test_model.tokens_for(model, batch=2, length=16)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "positions": jnp.broadcast_to(jnp.arange(16), (2, 16)),
        "segment_ids": jnp.ones((2, 16), jnp.int32),
        "loss_mask": jnp.ones((2, 16), jnp.float32),
    }
    loss_fn = jax.jit(next_token_loss(model))
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {}, batch, None)
    cfg = model.config
    expected = aux["nll"] + cfg.router_aux_coef * aux["moe/balance_loss"]
    expected += cfg.router_z_coef * aux["moe/router_z_loss"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    moe = grads["layers"][0]["mlp"]
    for name in ("router", "gate", "up", "down"):
        g = np.asarray(moe[name])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name
    # 64 assignments reach every expert of this model, so each expert has a gradient.
    for name in ("gate", "up", "down"):
        assert np.all(np.abs(np.asarray(moe[name])).sum(axis=(1, 2)) > 0), name
    # Router statistics pass through rematerialised blocks unchanged.
    loss_fn = jax.jit(jax.value_and_grad(next_token_loss(remat), has_aux=True))
    (loss2, aux2), grads2 = loss_fn(params, {}, batch, None)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(aux2["moe/balance_loss"], aux["moe/balance_loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_causality_packing_and_cache_decoding(tiny):
    """Routing is per token: later tokens, other documents and the cache change no earlier logit."""
    model, params = tiny
    apply = jax.jit(model.apply)
    x = test_model.tokens_for(model, batch=2, length=16)
    y = x.at[:, 10].set((x[:, 10] + 1) % model.config.vocab_size)
    full, changed = apply(params, x), apply(params, y)
    np.testing.assert_array_equal(full[:, :10], changed[:, :10])
    assert np.abs(full[:, 10:] - changed[:, 10:]).max() > 0

    seg = jnp.asarray([[1] * 8 + [2] * 8] * 2, jnp.int32)
    pos = jnp.asarray([list(range(8)) * 2] * 2, jnp.int32)
    packed = jax.jit(lambda p, t: model.apply(p, t, positions=pos, segment_ids=seg))(params, x)
    np.testing.assert_allclose(packed[:, :8], apply(params, x[:, :8]), atol=1e-5)
    np.testing.assert_allclose(packed[:, 8:], apply(params, x[:, 8:]), atol=1e-5)

    cache = model.init_cache(2, 16)
    outs = []
    for t, n in [(0, 8)] + [(t, 1) for t in range(8, 16)]:
        logits, cache = apply(params, x[:, t : t + n], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def test_dense_models_are_unchanged_and_return_empty_aux():
    model = llmjax.build("llama3-tiny")
    params = model.init(jax.random.key(0))
    tokens = test_model.tokens_for(model, length=8)
    logits, aux = jax.jit(lambda p, t: model.apply(p, t, return_aux=True))(params, tokens)
    assert aux == {}
    np.testing.assert_array_equal(logits, jax.jit(model.apply)(params, tokens))
    assert model.num_active_params() == model.num_params()


# Published sizes, by jax.eval_shape (nothing allocated): total and active per token.
PUBLISHED = {
    "mixtral-8x7b": (46_702_792_704, 12_879_925_248),  # 46.7B / 12.9B
    "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),  # 30.5B / 3.3B
    # 14.3B / 2.7B. "A2.7B" counts the embedding and the untied head (2 x 311M): without them a
    # token uses 2.07B, the published "2.0B activated non-embedding parameters".
    "qwen1.5-moe-a2.7b": (14_315_784_192, 2_689_173_504),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_presets_have_published_parameter_counts_and_trace(name):
    model = llmjax.build(name)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[name][0]
    assert (model.num_params(), model.num_active_params()) == PUBLISHED[name]
    # The forward pass traces at full width (two of the layers, to keep the test fast).
    model = llmjax.build(model.config.replace(n_layers=2))
    shapes = model.abstract_params()
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    out, aux = jax.eval_shape(
        jax.jit(lambda p, t: model.apply(p, t, return_aux=True)), shapes, tokens
    )
    assert out.shape == (1, 16, model.config.vocab_size)
    assert set(aux) == {"balance_loss", "router_z_loss"}


def test_bad_moe_configs_name_the_field():
    with pytest.raises(
        ConfigError, match=r"experts_per_token=9: must be an int in \[1, n_experts=8\]"
    ):
        llmjax.build("qwen3-moe-tiny", experts_per_token=9)
    with pytest.raises(ConfigError, match="dense_layers=.*distinct layer indices"):
        llmjax.build("qwen3-moe-tiny", dense_layers=(3,))
    with pytest.raises(ConfigError, match="router='top1'"):
        llmjax.build("mixtral-tiny", router="top1")
    with pytest.raises(ConfigError, match="moe_dispatch='drop'"):
        llmjax.build("mixtral-tiny", moe_dispatch="drop")
    with pytest.raises(ConfigError, match="gated_mlp=False: experts are gated"):
        llmjax.build("mixtral-tiny", gated_mlp=False)
    with pytest.raises(ConfigError, match="shared_expert_gate=True: gates the shared expert"):
        llmjax.build("qwen2-moe-tiny", shared_expert_dim=0)
