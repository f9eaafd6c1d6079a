"""The mesh hook: parse ``data=2,fsdp=-1,tensor=1``, build a mesh, place state and batches.

Deliberately small: a rule table maps the model's logical parameter axes to mesh axes (FSDP
shards the ``embed`` dimension, tensor parallelism the heads/MLP/vocab dimensions), any dimension
the mesh does not divide stays replicated, and batches split over ``data`` x ``fsdp``.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax import axes
from llmjax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PARAM_RULES = {
    axes.EMBED: "fsdp",
    axes.HEADS: "tensor",
    axes.KV_HEADS: "tensor",
    axes.MLP: "tensor",
    axes.VOCAB: "tensor",
}
ACTIVATION_RULES = {axes.ACT_BATCH: BATCH_AXES}


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> sizes of every mesh axis; one -1 takes the remaining devices."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    given = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise ConfigError(f"--mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        try:
            given[name] = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {spec!r}: {name}={value!r} is not an integer") from None
    if not given:
        given = {"data": -1}
    if list(given.values()).count(-1) > 1:
        raise ConfigError(f"--mesh {spec!r}: at most one axis may be -1")
    known = math.prod(v for v in given.values() if v != -1)
    if any(v == 0 or v < -1 for v in given.values()) or num_devices % known:
        raise ConfigError(
            f"--mesh {spec!r}: sizes must be positive and divide the {num_devices} devices"
        )
    for name, v in given.items():
        sizes[name] = num_devices // known if v == -1 else v
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(
            f"--mesh {spec!r}: {sizes} uses {math.prod(sizes.values())} devices, "
            f"but there are {num_devices}; use -1 for one axis"
        )
    return sizes


def make_mesh(spec: str = "", devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = parse_mesh(spec, len(devices))
    grid = np.array(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    # jax.sharding.Mesh has Auto axes, which the models' GSPMD-style einsums need.
    return Mesh(grid, MESH_AXES)


def param_spec(names, shape, mesh: Mesh) -> PartitionSpec:
    spec = axes.logical_to_spec(names, PARAM_RULES)
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
        group = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = math.prod(mesh.shape[a] for a in group)
        out.append(axis if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(abstract_state, param_axes, mesh: Mesh):
    """Shardings for ``{"step", "params", "opt_state", "rng"}``: optimizer moments follow params."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = abstract_state["params"]
    by_shape = {}
    param_sh = jax.tree.map(
        lambda p, names: NamedSharding(mesh, param_spec(names, p.shape, mesh)),
        params,
        param_axes,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(n, str | None) for n in x),
    )
    # Adam's mu/nu mirror the parameter tree; match them by tree path suffix.
    flat_params = jax.tree_util.tree_flatten_with_path(param_sh)[0]
    for path, sh in flat_params:
        by_shape[tuple(str(k) for k in path)] = sh

    def opt_leaf(path, leaf):
        keys = tuple(str(k) for k in path)
        for n in range(len(keys)):
            sh = by_shape.get(keys[n:])
            if sh is not None and len(sh.spec) <= leaf.ndim:
                return sh
        return replicated

    opt_sh = jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"])
    return {"step": replicated, "params": param_sh, "opt_state": opt_sh, "rng": replicated}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (batch_size // grad_accum) % ways:
        raise ConfigError(
            f"data.batch_size={batch_size} / loop.grad_accum={grad_accum} must be "
            f"divisible by the data x fsdp mesh size {ways}"
        )


def activation_rules(mesh: Mesh):
    """The context under which a step traces, so models constrain activations to the mesh."""
    return axes.use_rules(mesh, ACTIVATION_RULES)
