"""DeepSeek-V3's auxiliary-loss-free balancing (``router_bias_update``): the selection bias, its
load pseudo-gradient, its sign update in the optimizer, and what it must leave untouched."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llmjax
from llmjax.config import ConfigError, ModelConfig
from llmjax.interop.hf_config import UnsupportedConfig
from llmjax.layers import moe
from llmjax.layers.moe import SELECTION_BIAS, route
from llmjax.lora import LoraConfig, apply_lora, init_lora
from llmjax.losses import next_token_loss
from llmjax.train.config import OptimizerConfig
from llmjax.train.optim import decay_mask, gradient_norm, lr_schedule, make_optimizer
from llmjax.train.step import init_state, make_train_step

GAMMA = 0.002


@functools.cache
def _model(gamma=GAMMA, **kw):
    """qwen3-moe-tiny with DeepSeek-V3's sigmoid router and one MoE layer (E=8, k=2)."""
    return llmjax.build(
        "qwen3-moe-tiny",
        router="sigmoid",
        router_bias_update=gamma,
        n_layers=1,
        dense_layers=(),
        **kw,
    )


def _batch(tokens_BT):
    B, T = tokens_BT.shape
    return {
        "tokens": tokens_BT,
        "targets": jnp.roll(tokens_BT, -1, axis=1),
        "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }


def _skewed(params):
    # Every token embedding shares one component, so every token leans toward the same experts.
    u_D = jax.random.normal(jax.random.key(7), params["embed"].shape[-1:])
    return {**params, "embed": params["embed"] + 0.02 * u_D}


BATCH = _batch(jax.random.randint(jax.random.key(1), (4, 32), 0, 512))


# route: selection moves, weights do not ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("norm_topk", [True, False])
def test_bias_changes_selection_but_not_the_weights_of_selected_experts(kind, norm_topk):
    logits_NE = jax.random.normal(jax.random.key(0), (64, 8))
    k = 2
    plain = route(logits_NE, k, kind, norm_topk)
    # Expert 5 gets a bias larger than any score difference: every token picks it.
    bias_E = jnp.zeros((8,)).at[5].set(2.0)
    weights_NR, experts_NR, probs_NE = route(logits_NE, k, kind, norm_topk, bias_E)
    assert (experts_NR == 5).any(-1).all()
    assert not (plain[1] == 5).any(-1).all()
    np.testing.assert_array_equal(probs_NE, plain[2])
    # The weights are the unbiased scores of the chosen experts, as route computes them.
    scores_NE = jax.nn.softmax(logits_NE) if kind == "softmax" else jax.nn.sigmoid(logits_NE)
    expected_NR = jnp.take_along_axis(scores_NE, experts_NR, axis=-1)
    if norm_topk:
        expected_NR = expected_NR / expected_NR.sum(-1, keepdims=True)
    np.testing.assert_allclose(weights_NR, expected_NR, rtol=1e-6)
    # Tokens whose choice the bias did not change keep route's weights bit for bit.
    same_N = (experts_NR == plain[1]).all(-1)
    assert same_N.any()
    np.testing.assert_array_equal(weights_NR[same_N], plain[0][same_N])
    # A zero bias is no bias at all.
    zero = route(logits_NE, k, kind, norm_topk, jnp.zeros((8,)))
    for a, b in zip(zero, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pseudo_gradient_is_load_minus_mean_load_over_real_tokens():
    # Four tokens, four experts, k=2; the largest logits pick: {0, 1}, {0, 1}, {0, 2}, {3, 0}.
    logits_NE = jnp.array(
        [
            [3.0, 2.0, 0.0, -1.0],
            [2.0, 3.0, -1.0, 0.0],
            [3.0, -1.0, 2.0, 0.0],
            [2.0, -1.0, 0.0, 3.0],
        ]
    )
    mask_N = jnp.array([True, True, True, False])  # the last token is padding
    bias_E = jnp.zeros((4,))
    w_NR = jax.random.normal(jax.random.key(3), (4, 2))

    def loss(bias_E, logits_NE, scale=1.0):
        weights_NR, experts_NR, _ = route(logits_NE, 2, "sigmoid", True, bias_E, mask_N)
        return scale * (weights_NR * w_NR).sum(), experts_NR

    (_, experts_NR), (g_E, g_NE) = jax.value_and_grad(loss, (0, 1), has_aux=True)(bias_E, logits_NE)
    np.testing.assert_array_equal(experts_NR, [[0, 1], [1, 0], [0, 2], [3, 0]])
    load_E = np.array([3.0, 2.0, 1.0, 0.0])  # real tokens only: 6 assignments, mean 1.5
    np.testing.assert_array_equal(g_E, load_E - 1.5)
    # Whatever the loss's scale (a micro-batch's weight): the step's loads are sums of counts.
    np.testing.assert_array_equal(jax.grad(lambda b: loss(b, logits_NE, 7.0)[0])(bias_E), g_E)
    # The router's own gradient is route's without a bias.
    g_plain = jax.grad(lambda x: (route(x, 2, "sigmoid", True)[0] * w_NR).sum())(logits_NE)
    np.testing.assert_array_equal(g_NE, g_plain)


# The optimizer ------------------------------------------------------------------------------------
def _update(model, params, opt):
    tx = make_optimizer(opt, 10, model=model.config)
    grads = jax.grad(lambda p: next_token_loss(model)(p, {}, BATCH, None)[0])(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return grads, updates


def test_one_update_moves_the_bias_by_gamma_sign_and_nothing_else_differently():
    on, off = _model(), _model(0.0)
    p_on = _skewed(on.init(jax.random.key(0)))
    p_off = _skewed(off.init(jax.random.key(0)))
    assert SELECTION_BIAS in p_on["layers"][0]["mlp"]
    assert SELECTION_BIAS not in p_off["layers"][0]["mlp"]
    # Clipping active (a norm far above clip_norm) and a learning rate other than gamma: were the
    # load counts clipped with the rest or fed to AdamW, both would show.
    opt = OptimizerConfig(lr=0.01, clip_norm=1e-3, warmup_steps=0, weight_decay=0.1)
    g_on, u_on = jax.jit(functools.partial(_update, on, opt=opt))(p_on)
    g_off, u_off = jax.jit(functools.partial(_update, off, opt=opt))(p_off)
    assert gradient_norm(g_off) > 100 * opt.clip_norm
    bias_g_E = g_on["layers"][0]["mlp"].pop(SELECTION_BIAS)
    bias_u_E = u_on["layers"][0]["mlp"].pop(SELECTION_BIAS)
    assert (bias_g_E != 0).sum() >= 4  # a skewed batch: most experts off their fair share
    np.testing.assert_array_equal(bias_u_E, -GAMMA * np.sign(bias_g_E))
    for a, b in zip(jax.tree.leaves((g_on, u_on)), jax.tree.leaves((g_off, u_off)), strict=True):
        np.testing.assert_array_equal(a, b)
    # The norm clipping compares with leaves the load counts out.
    np.testing.assert_array_equal(gradient_norm(g_on), gradient_norm(g_off))


def test_an_optimizer_without_gamma_refuses_selection_biases():
    params = jax.eval_shape(_model().init, jax.random.key(0))
    tx = make_optimizer(OptimizerConfig(), 10)
    with pytest.raises(ConfigError, match="router_bias_update"):
        jax.eval_shape(tx.init, params)
    tx = make_optimizer(OptimizerConfig(), 10, model=_model(0.0).config)
    with pytest.raises(ConfigError, match="make_optimizer"):
        jax.eval_shape(tx.init, params)


def test_without_the_option_the_optimizer_state_is_unchanged():
    # Checkpoints of runs without it still resume: the optimizer state tree AdamW always had.
    opt = OptimizerConfig()
    params = jax.eval_shape(_model(0.0).init, jax.random.key(0))
    adamw = optax.adamw(
        lr_schedule(opt, 10),
        b1=opt.b1,
        b2=opt.b2,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        mask=decay_mask,
    )
    plain = optax.chain(optax.clip_by_global_norm(opt.clip_norm), adamw)
    ours = make_optimizer(opt, 10, model=_model(0.0).config)
    assert jax.tree.structure(jax.eval_shape(ours.init, params)) == jax.tree.structure(
        jax.eval_shape(plain.init, params)
    )


# Training ------------------------------------------------------------------------------------------
def _loads(model, params, monkeypatch):
    """Each MoE layer's load per expert on ``BATCH`` (the router statistics, recorded eagerly)."""
    seen = []

    def recording(*args):
        stats = router_stats(*args)
        seen.append(np.asarray(stats["load"]))
        return stats

    router_stats = moe.router_stats
    with monkeypatch.context() as m:
        m.setattr(moe, "router_stats", recording)
        model.apply(params, BATCH["tokens"])
    return seen


def _imbalance(loads):
    return max(load.max() / load.mean() for load in loads)


def test_training_steps_reduce_the_load_imbalance_of_a_skewed_batch(monkeypatch):
    # A small learning rate: the routing then changes through the bias, not the router's weights.
    opt = OptimizerConfig(lr=1e-4, warmup_steps=0)
    end = {}
    for gamma in (0.0, GAMMA):
        model = _model(gamma)
        tx = make_optimizer(opt, 10, model=model.config)
        state = init_state(model, tx, 0)
        state["params"] = _skewed(state["params"])
        start = _imbalance(_loads(model, state["params"], monkeypatch))
        assert start > 2.5  # of at most E / k = 4
        step = jax.jit(make_train_step(next_token_loss(model), tx, grad_accum=2))
        for _ in range(10):
            state, _ = step(state, {}, BATCH)
        end[gamma] = _imbalance(_loads(model, state["params"], monkeypatch))
    assert end[0.0] > 2.0
    assert end[GAMMA] < 1.5
    # The bias is a parameter of the state the loop checkpoints, and moved by whole steps.
    bias_E = np.asarray(state["params"]["layers"][0]["mlp"][SELECTION_BIAS])
    assert bias_E.dtype == np.float32 and bias_E.shape == (8,)
    steps_E = bias_E / GAMMA
    np.testing.assert_allclose(steps_E, np.round(steps_E), atol=1e-3)
    assert np.abs(steps_E).max() >= 3


def test_the_bias_is_checkpointed_and_restored_with_its_optimizer_state(tmp_path):
    from llmjax.checkpoint.manager import Checkpointer, restore

    model = _model()
    tx = make_optimizer(OptimizerConfig(), 10, model=model.config)
    state = init_state(model, tx, 0)
    state["params"]["layers"][0]["mlp"][SELECTION_BIAS] = jnp.arange(8.0) * GAMMA
    ckpt = Checkpointer(tmp_path, keep_best=False, async_save=False)
    ckpt.save(1, state, {"step": 1})
    ckpt.close()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state
    )
    restored, _ = restore(tmp_path / "1", abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    np.testing.assert_array_equal(
        restored["params"]["layers"][0]["mlp"][SELECTION_BIAS], jnp.arange(8.0) * GAMMA
    )


def test_optimizer_state_shards_like_the_parameters():
    from llmjax.train.mesh import make_mesh, rules_for, state_shardings

    model = _model()
    tx = make_optimizer(OptimizerConfig(), 10, model=model.config)
    mesh = make_mesh()
    shardings = state_shardings(model, tx, mesh, rules_for(mesh))
    abstract = jax.eval_shape(tx.init, model.abstract_params())
    assert jax.tree.structure(shardings["opt_state"]) == jax.tree.structure(abstract)
    assert model.param_axes()["layers"][0]["mlp"][SELECTION_BIAS] == ("experts",)
    # Steps of 0.001 need float32 whatever the other parameters are stored in.
    bf16 = _model(param_dtype="bfloat16").abstract_params()["layers"][0]["mlp"]
    assert bf16[SELECTION_BIAS].dtype == jnp.float32 and bf16["router"].dtype == jnp.bfloat16


# Frozen bases, exports, configs -------------------------------------------------------------------
def test_lora_over_a_base_with_a_selection_bias_keeps_it_fixed():
    model = _model()
    base = model.init(jax.random.key(0))
    cfg = LoraConfig(rank=2, targets=r"layers\.\d+\.attn\.(wq|wv)")
    adapters = init_lora(model, cfg, jax.random.key(1))
    tx = make_optimizer(OptimizerConfig(), 10, model=model.config)
    loss = next_token_loss(model)

    def lora_loss(adapters, frozen, batch, rng):
        return loss(apply_lora(frozen["base"], adapters, cfg), {}, batch, rng)

    state = {
        "step": 0,
        "params": adapters,
        "opt_state": tx.init(adapters),
        "rng": jax.random.key(2),
    }
    new, metrics = jax.jit(make_train_step(lora_loss, tx))(state, {"base": base}, BATCH)
    assert np.isfinite(metrics["loss"])
    assert jax.tree.structure(new["params"]) == jax.tree.structure(adapters)
    # The base's bias still steers the routing of the adapted model.
    biased = jax.tree.map(lambda x: x, base)
    biased["layers"][0]["mlp"][SELECTION_BIAS] = jnp.zeros((8,)).at[0].set(1.0)
    loss_fn = jax.jit(lora_loss)
    assert (
        loss_fn(adapters, {"base": biased}, BATCH, None)[0]
        != loss_fn(adapters, {"base": base}, BATCH, None)[0]
    )


def test_to_hf_refuses_a_selection_bias(tmp_path):
    mixtral = llmjax.build("mixtral-tiny", router_bias_update=GAMMA)
    with pytest.raises(UnsupportedConfig, match="router_bias_update"):
        llmjax.to_hf(mixtral, mixtral.abstract_params(), tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"n_experts": 8, "router_bias_update": -0.001}, ">= 0"),
        ({"n_experts": 8, "router_bias_update": float("nan")}, ">= 0"),
        ({"n_experts": 8, "router_bias_update": float("inf")}, "finite"),
        ({"router_bias_update": 0.001}, "n_experts=0"),
    ],
)
def test_config_errors(fields, match):
    base = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    with pytest.raises(ConfigError, match=f"router_bias_update.*{match}"):
        ModelConfig(**base, **fields)


def test_pretrain_cli_moves_the_bias_and_resumes_bit_for_bit(tmp_path):
    """Through the one training loop, as users run it: ``llmjax pretrain`` with the option,
    stopped by SIGTERM and restarted, logs the uninterrupted run's losses and grad norms."""
    import signal

    from tests.train.test_resume import finish, losses, run_until
    from tests.train.test_resume import launch as launch_pretrain

    moe_flags = (
        "--set", "model.n_experts=8", "--set", "model.experts_per_token=2",
        "--set", "model.router=sigmoid", "--set", f"model.router_bias_update={GAMMA}",
    )  # fmt: skip
    steps = 10
    ref_out, out = tmp_path / "ref" / "run", tmp_path / "stopped" / "run"
    ref_out.parent.mkdir()
    out.parent.mkdir()
    code, log = finish(launch_pretrain(ref_out, steps, extra=moe_flags))
    assert code == 0, log
    code, log = run_until(out, 3, signal.SIGTERM, steps=steps, extra=moe_flags)
    assert max(losses(out)) < steps, "the run ended before it could be stopped"
    code, log = finish(launch_pretrain(out, steps, extra=moe_flags))
    assert code == 0, log
    assert losses(out) == losses(ref_out)
    # The run's parameters hold the biases, moved by whole steps of gamma.
    from llmjax.models.scan import unstack_layers
    from llmjax.runs import load_run

    run = load_run(ref_out)
    layers = unstack_layers(run.model.config, run.params)["layers"]  # scanned: read per layer
    biases = [layers[i]["mlp"][SELECTION_BIAS] for i in range(len(layers))]
    steps_E = np.concatenate([np.asarray(b) for b in biases]) / GAMMA
    np.testing.assert_allclose(steps_E, np.round(steps_E), atol=1e-3)
    assert np.abs(steps_E).max() >= 1
