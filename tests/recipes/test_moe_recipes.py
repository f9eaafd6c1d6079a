"""Mixture-of-experts policies train with their router losses in every post-training recipe.

Each recipe's own loss, on a tiny MoE model, equals the same loss with the router coefficients at
0 plus the weighted router losses of the trained forwards recomputed here from
``model.apply(..., return_aux=True)``; the router weights get that term's gradient; frozen
forwards (a reference, a teacher) add nothing; a dense model's loss has no ``moe/`` metrics. A
``llmjax dpo`` run on a Mixtral base logs them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import llmjax
from llmjax.recipes import distill, ppo, preference, rl
from llmjax.recipes.pairs import flat, pair_logps
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_pairs

B, T = 4, 16
COEFS = {"router_aux_coef": 0.05, "router_z_coef": 0.01}
MOE = llmjax.build("mixtral-tiny", n_layers=1, **COEFS)
DENSE = llmjax.build("llama3-tiny", vocab_size=MOE.config.vocab_size, d_model=32, n_layers=1)
RECIPES = ("dpo", "reward", "grpo", "ppo", "distill")


def without_router_loss(model):
    return llmjax.build(model.config.replace(router_aux_coef=0.0, router_z_coef=0.0))


def is_router(path) -> bool:
    return getattr(path[-1], "key", None) == "router"


def init(model, seed: int):
    """Random parameters drawn on the host, which compiles nothing: norms at 1, matrices small."""
    rng = np.random.default_rng(seed)

    def draw(x):
        if len(x.shape) == 1:
            return np.ones(x.shape, x.dtype)
        return (0.2 * rng.normal(size=x.shape)).astype(x.dtype)

    return jax.tree.map(draw, model.abstract_params())


def router_tangent(params):
    """A tangent along the router weights only: a loss's derivative along it is the router
    weights' gradient, dotted with it (one forward-mode pass reads it)."""
    rng = np.random.default_rng(7)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.normal(size=np.shape(x)) * is_router(path)).astype(x.dtype), params
    )


def rows(seed: int, n: int):
    """``n`` rows of ``T`` tokens: the last ``i % 4`` slots of row ``i`` are padding; the second
    half of each row's real tokens is scored."""
    tokens = np.random.default_rng(seed).integers(1, MOE.config.vocab_size, (n, T), np.int32)
    slot = np.broadcast_to(np.arange(T, dtype=np.int32), (n, T))
    real = slot < T - np.arange(n)[:, None] % 4
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "positions": slot,
        "segment_ids": real.astype(np.int32),
        "loss_mask": (real & (slot >= T // 2) & (slot < T - 1)).astype(np.float32),
    }


def pairs(seed: int):
    """``B`` pairs ``[B, 2, T]``, as ``llmjax.data.preference`` lays them out."""
    r = rows(seed, 2 * B)
    return {k: np.stack([v[:B], v[B:]], axis=1) for k, v in r.items()}


def identity(params, frozen, rng=None):
    return params


def normal(seed: int, shape, scale: float = 1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def case(recipe: str, model):
    """``(loss, params, frozen, batch, trained)``: the recipe's training loss for ``model``, its
    inputs, and ``trained(params)`` -> ``[(scale, decoder params, rows)]``, one per forward of a
    trained decoder in the loss."""
    head = {"score": normal(1, (model.config.d_model,), 0.1)}
    if recipe == "dpo":
        batch = pairs(2)

        def reference(frozen, batch):  # online, from a frozen copy: no router losses of its own
            return pair_logps(model, frozen["reference"], batch, chunk=0)[0]

        # The test differentiates forward (jvp), which the chunked cross-entropy's custom VJP
        # does not define: the full-logits path (loop.ce_chunk=0), equal to it (test_chunked_ce).
        dpo = preference.DPOConfig()
        dpo = dataclasses.replace(dpo, loop=dataclasses.replace(dpo.loop, ce_chunk=0))
        loss = preference._dpo_loss(dpo, model, identity, reference)
        frozen = {"reference": init(model, 1)}
        return loss, init(model, 0), frozen, batch, lambda p: [(1.0, p, flat(batch))]
    if recipe == "reward":
        batch = pairs(2)
        loss = preference._reward_loss(preference.RewardConfig(), model, identity)
        params = {"decoder": init(model, 0), "head": head}
        return loss, params, {}, batch, lambda p: [(1.0, p["decoder"], flat(batch))]
    batch = rows(2, B)
    if recipe == "grpo":
        batch.update(keep=np.asarray([1, 1, 0, 1], np.float32), advantages=normal(3, (B,)))
        loss = rl.make_loss(rl.GRPOConfig(), model, identity, reference=None)
        return loss, init(model, 0), {}, batch, lambda p: [(1.0, p, batch)]
    if recipe == "ppo":
        cfg = ppo.PPOConfig(beta=0.0)
        batch["keep"] = np.ones((B,), np.float32)
        batch["old_logps"] = -(normal(3, (B, T)) ** 2)
        for i, k in enumerate(("old_values", "advantages", "returns")):
            batch[k] = normal(4 + i, (B, T))
        params = {"policy": init(model, 0), "critic": {"decoder": init(model, 1), "head": head}}
        policy_of = lambda p, f, r=None: p["policy"]  # noqa: E731
        loss = ppo.make_loss(cfg, model, policy_of, ppo.critic_of(model, identity))

        def trained(p):
            return [(1.0, p["policy"], batch), (cfg.vf_coef, p["critic"]["decoder"], batch)]

        return loss, params, {}, batch, trained
    assert recipe == "distill"
    # The teacher is a mixture of experts too: frozen, its router losses are not the student's.
    frozen = {"teacher": init(MOE, 1)}
    loss = distill.make_loss(distill.DistillConfig(alpha=0.5), model, MOE, stop_ids=())
    return loss, init(model, 0), frozen, batch, lambda p: [(1.0, p, batch)]


def router_terms(model, trained, params):
    """``((sum of scale * weighted router losses, sum of scale * balance), the first forward's
    aux)`` over the trained forwards, from ``model.apply`` itself."""
    cfg, total, balance, first = model.config, 0.0, 0.0, None
    for scale, decoder, r in trained(params):
        _, aux = model.apply(
            decoder,
            r["tokens"],
            positions=r["positions"],
            segment_ids=r["segment_ids"],
            return_aux=True,
        )
        weighted = cfg.router_aux_coef * aux["balance_loss"]
        weighted += cfg.router_z_coef * aux["router_z_loss"]
        total, balance = total + scale * weighted, balance + scale * aux["balance_loss"]
        first = aux if first is None else first
    return (total, balance), first


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_moe_policy_adds_its_router_losses(recipe):
    loss, params, frozen, batch, trained = case(recipe, MOE)
    off = case(recipe, without_router_loss(MOE))[0]

    @jax.jit
    def measure(params, tangent):
        rng = jax.random.PRNGKey(1)
        at = lambda f: jax.jvp(f, (params,), (tangent,), has_aux=True)  # noqa: E731
        value, d_value, m = at(lambda p: loss(p, frozen, batch, rng))
        base, d_base, m0 = at(lambda p: off(p, frozen, batch, rng))
        (extra, balance), (d_extra, d_balance), aux = at(lambda p: router_terms(MOE, trained, p))
        return value, base, extra, d_value, d_base, d_extra, d_balance, m, m0, aux

    value, base, extra, d_value, d_base, d_extra, d_balance, m, m0, aux = measure(
        params, router_tangent(params)
    )
    assert extra > 0
    np.testing.assert_allclose(value, base + extra, rtol=1e-6)
    assert m.keys() == m0.keys()
    for k in m0:  # the coefficients change the loss, not what it reports
        np.testing.assert_allclose(m[k], m0[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(m["moe/balance_loss"], aux["balance_loss"], rtol=1e-6)
    np.testing.assert_allclose(m["moe/router_z_loss"], aux["router_z_loss"], rtol=1e-6)
    critic = {"moe/critic_balance_loss", "moe/critic_router_z_loss"} if recipe == "ppo" else set()
    assert {k for k in m if k.startswith("moe/")} == {
        "moe/balance_loss",
        "moe/router_z_loss",
        *critic,
    }
    # The router weights get the router terms' gradient, the balancing loss's included.
    assert d_balance != 0
    np.testing.assert_allclose(d_value - d_base, d_extra, rtol=1e-4)


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_dense_policy_has_no_router_metrics(recipe):
    loss, params, frozen, batch, _ = case(recipe, DENSE)
    value, m = jax.jit(loss)(params, frozen, batch, jax.random.PRNGKey(1))
    assert np.isfinite(value) and not [k for k in m if k.startswith("moe/")]


@pytest.mark.slow  # a whole run: about half a minute on one core
def test_dpo_on_a_mixtral_base_logs_its_router_losses(tmp_path):
    from llmjax.cli import main

    base = make_base(tmp_path / "base", arch="mixtral")
    data = write_pairs(tmp_path / "pairs.jsonl")
    args = ["dpo", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run")]
    args += ["--batch-size", "4", "--seq-len", "24", "--steps", "2", "--lr", "1e-3"]
    for setting in ("loop.log_every=1", "loop.eval_every=2", "loop.save_every=2"):
        args += ["--set", setting]
    assert main(args) == 0
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in logged] == [1, 2]
    for r in logged:
        assert r["moe/balance_loss"] > 0 and np.isfinite(r["moe/router_z_loss"])
