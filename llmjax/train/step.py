"""The pure train step and eval step. The loss is an argument: recipes differ only there.

``loss_fn(params, frozen, batch, rng) -> (loss, aux)`` (see ``llmjax.losses``). The state is a
plain dict, so orbax saves and restores it like any pytree: ``{"step", "params", "opt_state",
"rng"}``, where ``params`` are the trainable parameters only; frozen pytrees (a base model, a
reference, a teacher) come in as a separate argument, never donated and never saved.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from llmjax.losses import SUMMED
from llmjax.train.optim import gradient_norm

LossFn = Callable[..., tuple[jax.Array, dict]]


def init_state(model, tx: optax.GradientTransformation, seed: int) -> dict:
    """A fresh state from ``model.init`` (call under ``jax.jit`` to place it on a mesh)."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(init_key)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": rng,
    }


def _weight(aux) -> jax.Array:
    return jax.lax.stop_gradient(jnp.asarray(aux.get("tokens", 1.0), jnp.float32))


def accumulate(loss_fn: LossFn, params, frozen, batch, rng, grad_accum: int):
    """``(loss, aux, grads)`` of the whole batch, computed in ``grad_accum`` micro-batches.

    Each micro-batch's loss is a mean over its own ``aux["tokens"]``; the sum of ``loss * tokens``
    over micro-batches divided by the total tokens is the whole batch's mean, so the result equals
    one step on the whole batch whatever the masks hold (the mean of micro-batch means would
    overweight a micro-batch with few scored tokens). Only one micro-batch's activations are alive
    at a time (``lax.scan``).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        (loss, aux), grads = grad_fn(params, frozen, batch, rng)
        return loss, aux, grads

    def weighted(p, f, b, r):
        loss, aux = loss_fn(p, f, b, r)
        w = _weight(aux)
        return loss * w, (aux, w)

    weighted_grad = jax.value_and_grad(weighted, has_aux=True)
    micro = jax.tree.map(
        lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch
    )
    rngs = jax.random.split(rng, grad_accum)

    def body(carry, xs):
        mb, r = xs
        (lw, (aux, w)), g = weighted_grad(params, frozen, mb, r)
        aux = {k: v if k in SUMMED else v * w for k, v in aux.items()}
        return jax.tree.map(jnp.add, carry, (lw, w, aux, g)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, (aux0, _)), g0 = jax.eval_shape(weighted_grad, params, frozen, first, rngs[0])
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), (jnp.float32(0), jnp.float32(0), aux0, g0)
    )
    (loss_w, total, aux, grads), _ = jax.lax.scan(body, zeros, (micro, rngs))
    total = jnp.where(total > 0, total, 1.0)  # no scored token at all: zero gradients, not NaN
    aux = {k: v if k in SUMMED else v / total for k, v in aux.items()}
    grads = jax.tree.map(lambda g: g / total, grads)
    return loss_w / total, aux, grads


def make_train_step(loss_fn: LossFn, tx, schedule=None, grad_accum: int = 1, updates: int = 1):
    """``step(state, frozen, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

    ``updates`` > 1 applies that many optimizer updates to the same batch, each from the
    parameters the previous one left (GRPO's ``num_iterations``: the clipped ratio then moves
    away from 1); metrics are their means, ``learning_rate`` the last update's.
    """

    def update(params, opt_state, count, frozen, batch, rng):
        loss, aux, grads = accumulate(loss_fn, params, frozen, batch, rng, grad_accum)
        deltas, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": gradient_norm(grads), **aux}
        if schedule is not None:
            metrics["learning_rate"] = schedule(count)
        return optax.apply_updates(params, deltas), opt_state, metrics

    def step(state, frozen, batch):
        rng, step_rng = jax.random.split(state["rng"])
        params, opt_state = state["params"], state["opt_state"]
        if updates == 1:
            params, opt_state, metrics = update(
                params, opt_state, state["step"], frozen, batch, step_rng
            )
        else:

            def body(carry, i):
                params, opt_state = carry
                key = jax.random.fold_in(step_rng, i)
                params, opt_state, m = update(
                    params, opt_state, state["step"] * updates + i, frozen, batch, key
                )
                return (params, opt_state), m

            (params, opt_state), ms = jax.lax.scan(body, (params, opt_state), jnp.arange(updates))
            metrics = {
                k: v[-1] if k == "learning_rate" else (v.sum() if k in SUMMED else v.mean())
                for k, v in ms.items()
            }
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
            "rng": rng,
        }
        return new_state, metrics

    return step


def make_eval_step(loss_fn: LossFn):
    """``eval_step(params, frozen, batch) -> (sums, tokens)``: metrics times tokens, to pool.

    ``sums["loss"]`` is the loss without regularisers (``aux["nll"]`` when the loss gives it).
    """

    def eval_step(params, frozen, batch):
        loss, aux = loss_fn(params, frozen, batch, jax.random.PRNGKey(0))
        tokens = jnp.asarray(aux.get("tokens", jnp.float32(batch["tokens"].size)), jnp.float32)
        sums = {k: v * tokens for k, v in aux.items() if k not in SUMMED}
        sums["loss"] = aux.get("nll", loss) * tokens
        return sums, tokens

    return eval_step
