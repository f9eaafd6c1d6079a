"""Expert parallelism: each device of the ``expert`` mesh axis holds and runs its share of experts.

Under a rule table that maps ``activation_experts`` to a mesh axis (the ``ep`` and ``ep_tp``
presets), the dropless dispatch of ``llmjax.layers.moe`` runs inside ``shard_map``:

1. the tokens of the devices along the expert axis (their activations, routes and weights) are
   all-gathered, so every device of an expert group sees every assignment of the group;
2. each device sorts the assignments that go to *its* experts by expert and runs them through
   ``ragged_dot`` (others are sorted past the last group and get no output);
3. each token's outputs are summed with its routing weights, and a reduce-scatter over the expert
   axis returns every device its own tokens with the contributions of all experts.

Tensor parallelism composes: experts' MLP widths stay split over the ``activation_mlp`` axis, and
the partial outputs are summed over it before the reduce-scatter. FSDP composes as it does for
every weight: ``shard_map``'s input gathers the ``embed`` shards before the layer runs.

Why gather and scatter rather than an all-to-all: it is dropless with static shapes (no capacity
per device pair, no token ever dropped, whatever the routing), and it runs on every backend,
so CPU tests check it against one device. A ragged all-to-all moves fewer bytes (about k/ep of
the gathered tokens each way, instead of all of them) but XLA:CPU does not implement it, so it
could not be tested here; it is the next step for large expert axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax import axes


def _axis(rules: dict, name: str, mesh) -> str | None:
    axis = rules.get(name)
    if isinstance(axis, (tuple, list)):
        axis = axis[0] if len(axis) == 1 else None
    return axis if axis and mesh.shape.get(axis, 1) > 1 else None


def plan(shape_BT) -> tuple | None:
    """``(mesh, expert_axis, tensor_axis, token_spec)`` when the active rules shard experts over
    a mesh axis of more than one device and the batch divides the token shards; else None (the
    layer then leaves placement to XLA's partitioner, e.g. a batch of one while decoding)."""
    active = axes.active_rules()
    if active is None:
        return None
    mesh, rules = active
    expert = _axis(rules, axes.ACT_EXPERTS, mesh)
    if expert is None:
        return None
    token_spec = axes.logical_to_spec((axes.ACT_BATCH, axes.ACT_LENGTH), rules)
    for dim, axis in zip(shape_BT, token_spec, strict=True):
        group = (axis,) if isinstance(axis, str) else tuple(axis or ())
        if dim % math.prod(mesh.shape[a] for a in group):
            return None
    tensor = _axis(rules, axes.ACT_MLP, mesh)
    if tensor in jax.tree.leaves(tuple(token_spec)):
        tensor = None
    return mesh, expert, tensor, token_spec


def dispatch(experts_fn, x_BTD, weights_BTR, experts_BTR, w_gate, w_up, w_down, plan_):
    """The routed experts' weighted output ``[B, T, D]`` with experts split over the mesh.

    ``experts_fn(x_AD, sizes_E, gate, up, down)`` runs the gated MLP of ``len(sizes_E)`` local
    experts on rows grouped by expert (``sizes_E`` rows each, the rest ignored).
    """
    mesh, expert, tensor, token_spec = plan_
    gathered = expert in jax.tree.leaves(tuple(token_spec))
    tok = P(*token_spec)
    w_in, w_out = P(expert, None, tensor), P(expert, tensor, None)

    def local(x_BTD, weights_BTR, experts_BTR, gate, up, down):
        B, T, D = x_BTD.shape
        R = experts_BTR.shape[-1]
        x_ND, w_NR, e_NR = (
            x_BTD.reshape(-1, D),
            weights_BTR.reshape(-1, R),
            experts_BTR.reshape(-1, R),
        )
        if gathered:
            x_ND, w_NR, e_NR = (
                jax.lax.all_gather(a, expert, axis=0, tiled=True) for a in (x_ND, w_NR, e_NR)
            )
        N, E = x_ND.shape[0], gate.shape[0]
        mine_NR = e_NR // E == jax.lax.axis_index(expert)
        # Other devices' assignments sort after the last local group: ragged_dot leaves them out.
        key_A = jnp.where(mine_NR, e_NR % E, E).reshape(-1)
        order_A = jnp.argsort(key_A, stable=True)
        sizes_E = jnp.bincount(key_A, length=E + 1)[:E].astype(jnp.int32)
        y_AD = experts_fn(x_ND[order_A // R], sizes_E, gate, up, down)
        inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(N * R))
        y_NRD = jnp.where(mine_NR[..., None], y_AD[inverse_A].reshape(N, R, D), 0)
        out_ND = jnp.einsum("NRD,NR->ND", y_NRD, w_NR.astype(y_NRD.dtype))
        if tensor is not None:
            out_ND = jax.lax.psum(out_ND, tensor)
        if gathered:
            out_ND = jax.lax.psum_scatter(out_ND, expert, scatter_dimension=0, tiled=True)
        else:
            out_ND = jax.lax.psum(out_ND, expert)
        return out_ND.reshape(B, T, D)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok, tok, tok, w_in, w_in, w_out),
        out_specs=tok,
        check_vma=False,
    )(x_BTD, weights_BTR, experts_BTR, w_gate, w_up, w_down)
