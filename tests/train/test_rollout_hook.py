"""The loop's hooks for RL: several optimizer updates per batch, and a host-side rollout before
each step whose key depends only on the seed and the step (so resume is bit-exact)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import llmjax
from llmjax.data import build_data
from llmjax.recipes import pretrain
from llmjax.train import make_train_step, next_token_loss, train
from llmjax.train.config import override
from tests.train.helpers import small_config


def test_updates_per_batch_equal_that_many_steps_on_one_batch(tmp_path):
    cfg = small_config()
    model = llmjax.build(cfg.model)
    batch = jax.tree.map(jnp.asarray, next(build_data(cfg.data, tmp_path, 512).train))
    tx = optax.adam(1e-2)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(1),
    }
    loss = next_token_loss(model)
    three, m3 = jax.jit(make_train_step(loss, tx, updates=3))(state, {}, batch)
    one = jax.jit(make_train_step(loss, tx))
    s, losses = state, []
    for _ in range(3):
        s, m = one(s, {}, batch)
        losses.append(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(three["params"]), jax.tree.leaves(s["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(float(m3["loss"]), np.mean(losses), rtol=1e-6)
    assert losses[2] < losses[0] and int(three["step"]) == 1


def _rollout_task(cfg, out):
    """Pretraining whose batch the rollout corrupts with key-dependent tokens, as a sampler
    would replace completions: the step then trains on what the rollout drew."""
    model = llmjax.build(cfg.model)
    task = pretrain.task(cfg, model, build_data(cfg.data, out, cfg.model.vocab_size))
    seen = []

    def rollout(params, frozen, batch, key, step):
        draw = jax.random.randint(key, batch["targets"].shape, 0, cfg.model.vocab_size)
        seen.append(np.asarray(draw[0, :4]))
        # Depends on the params too, as a sampler's output does.
        scale = jax.tree.leaves(params)[0].ravel()[0]
        return {**batch, "targets": draw}, {"rollout/scale": float(scale)}

    return dataclasses.replace(task, rollout=rollout, updates_per_batch=2), seen


def test_rollout_hook_resumes_bit_exact(tmp_path):
    cfg = override(small_config(steps=4, save_every=2), "optim.schedule=constant")
    straight, seen = _rollout_task(cfg, tmp_path / "a")
    a = train(cfg, straight, tmp_path / "a", log=lambda *_: None)
    half = override(cfg, "loop.steps=2")
    first, _ = _rollout_task(half, tmp_path / "b")
    train(half, first, tmp_path / "b", log=lambda *_: None)
    second, seen_b = _rollout_task(cfg, tmp_path / "b")
    b = train(cfg, second, tmp_path / "b", log=lambda *_: None)
    assert [a.losses[s] for s in (3, 4)] == [b.losses[s] for s in (3, 4)]
    np.testing.assert_array_equal(np.stack(seen[2:]), np.stack(seen_b))
    assert not np.array_equal(seen[0], seen[1])  # a new draw each step
