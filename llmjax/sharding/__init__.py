"""Sharding: logical axis names -> mesh axes, sharded initialisation, and a per-device report.

    mesh = MeshConfig.parse("fsdp=4,tensor=2").build()
    params = init_params(model, jax.random.key(0), mesh, "fsdp_tp")   # born sharded
    print(describe(params))
    with activation_rules(mesh, "fsdp_tp"):
        loss = jax.jit(step)(...)

Model code names logical axes only (``llmjax.axes``); the tables in ``rules.py`` place them.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax import axes
from llmjax.sharding.mesh import MeshConfig
from llmjax.sharding.rules import (
    BATCH_AXES,
    MESH_AXES,
    PRESETS,
    Rules,
    ShardingError,
    default_rules,
    get_rules,
    param_spec,
)


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(n, str) for n in x)


def _paths(tree) -> dict:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_names)[0]
    }


def param_specs(model, mesh: Mesh, rules: str | Rules):
    """A tree of PartitionSpecs shaped like the model's parameters (shapes only, no memory)."""
    rules = get_rules(rules)
    shapes = model.abstract_params()
    names = _paths(model.param_axes())
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    specs = []
    for path, leaf in flat:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        specs.append(param_spec(key, names[key], leaf.shape, mesh, rules))
    return jax.tree.unflatten(tree, specs)


def param_shardings(model, mesh: Mesh, rules: str | Rules):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s),
        param_specs(model, mesh, rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def init_params(model, key, mesh: Mesh, rules: str | Rules):
    """Parameters created directly in their shardings: no device ever holds the whole model."""
    return jax.jit(model.init, out_shardings=param_shardings(model, mesh, rules))(key)


def optimizer_shardings(
    tx: optax.GradientTransformation, params_shardings, abstract_params, mesh: Mesh
):
    """Optimizer-state shardings: moments shard like their parameters, counters replicate."""
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract,
        params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split their first dimension over ``data x fsdp x expert``."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_ways(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_batch(local_batch, mesh: Mesh):
    """The global batch from each process's own rows (``[B_local, ...]`` numpy arrays).

    Every process passes only the rows it loaded; ``B_local * process_count`` is the global batch.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        ways = batch_ways(mesh)
        if (x.shape[0] * jax.process_count()) % ways:
            raise ShardingError(
                f"global batch {x.shape[0] * jax.process_count()} is not divisible "
                f"by data x fsdp x expert = {ways}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def activation_rules(mesh: Mesh, rules: str | Rules):
    """Context in which model code's ``axes.constrain`` calls place activations on ``mesh``."""
    return axes.use_rules(mesh, get_rules(rules).activations)


def describe(params, *, print_table: bool = True) -> str:
    """Each parameter's shape, dtype, PartitionSpec and bytes per device, with totals."""
    rows, total, per_device = [], 0, 0
    for path, x in _paths(params).items():
        sharding = getattr(x, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        shard = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
        local = int(np.prod(shard)) * x.dtype.itemsize
        total, per_device = total + nbytes, per_device + local
        rows.append((path, str(tuple(x.shape)), str(x.dtype), str(tuple(spec)), f"{local:,}"))
    header = ("parameter", "shape", "dtype", "spec", "bytes/device")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + f"  {{:>{widths[-1]}}}"
    lines = [fmt.format(*header), *(fmt.format(*r) for r in rows)]
    lines.append(f"total: {total:,} bytes; per device: {per_device:,} bytes")
    text = "\n".join(lines)
    if print_table:
        print(text)
    return text


__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "PRESETS",
    "MeshConfig",
    "Rules",
    "ShardingError",
    "activation_rules",
    "batch_sharding",
    "batch_ways",
    "default_rules",
    "describe",
    "get_rules",
    "init_params",
    "optimizer_shardings",
    "param_shardings",
    "param_specs",
    "shard_batch",
]
