"""The pure train step and eval step. The loss is an argument: recipes differ only there.

``loss_fn(params, batch, rng) -> (loss, metrics)`` where ``batch`` is a dict of ``[B, ...]``
arrays and ``metrics`` a dict of scalars. The state is a plain dict, so orbax saves and restores
it like any pytree: ``{"step", "params", "opt_state", "rng"}``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[..., tuple[jax.Array, dict]]


def init_state(model, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh state (call under ``jax.jit`` with ``out_shardings`` to place it on a mesh)."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": rng,
    }


def make_train_step(loss_fn: LossFn, tx, schedule=None, grad_accum: int = 1):
    """``step(state, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

    With ``grad_accum > 1`` the batch is split into that many micro-batches along its first axis
    and their gradients averaged in a ``lax.scan``, so one update sees the whole batch while the
    activations of only one micro-batch are alive at a time.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        rng, step_rng = jax.random.split(state["rng"])
        params = state["params"]
        if grad_accum == 1:
            (loss, aux), grads = grad_fn(params, batch, step_rng)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
            )
            rngs = jax.random.split(step_rng, grad_accum)

            def body(carry, xs):
                mb, r = xs
                (l, a), g = grad_fn(params, mb, r)
                return jax.tree.map(jnp.add, carry, (l, a, g)), None

            (_, aux0), g0 = jax.eval_shape(
                grad_fn, params, jax.tree.map(lambda x: x[0], micro), rngs[0]
            )
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (jnp.float32(0), aux0, g0))
            (loss, aux, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
            loss, aux, grads = jax.tree.map(lambda x: x / grad_accum, (loss, aux, grads))
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux}
        if schedule is not None:
            metrics["learning_rate"] = schedule(state["step"])
        new_state = {
            "step": state["step"] + 1,
            "params": new_params,
            "opt_state": opt_state,
            "rng": rng,
        }
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, batch) -> (loss * tokens, tokens)`` so batches can be token-weighted."""

    def eval_step(params, batch):
        loss, aux = loss_fn(params, batch, jax.random.PRNGKey(0))
        tokens = aux.get("tokens", jnp.float32(batch["tokens"].size))
        return aux.get("nll", loss) * tokens, tokens

    return eval_step
