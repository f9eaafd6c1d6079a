"""The training loop's view of ``llmjax.sharding``: a mesh from ``loop.mesh``, state shardings.

The loop's state is ``{"step", "params", "opt_state", "rng"}``: parameters follow the rule table
(``loop.rules``, or the preset the mesh implies), Adam's moments follow their parameters, and the
step counter and RNG key are replicated.
"""

from __future__ import annotations

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax import sharding
from llmjax.config import ConfigError
from llmjax.sharding import ShardingError


def make_mesh(spec: str = "", devices=None) -> Mesh:
    try:
        return sharding.MeshConfig.parse(spec).build(devices)
    except ShardingError as e:
        raise ConfigError(f"--mesh: {e}") from None


def rules_for(mesh: Mesh, rules: str = "") -> str:
    """The parallelism preset: as given, else what the mesh implies (fsdp/tensor axes in use)."""
    return rules or sharding.default_rules(dict(mesh.shape))


def state_shardings(model, tx, mesh: Mesh, rules: str):
    replicated = NamedSharding(mesh, PartitionSpec())
    try:
        params = sharding.param_shardings(model, mesh, rules)
    except ShardingError as e:
        raise ConfigError(str(e)) from None
    opt = sharding.optimizer_shardings(tx, params, model.abstract_params(), mesh)
    return {"step": replicated, "params": params, "opt_state": opt, "rng": replicated}


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    ways = sharding.batch_ways(mesh)
    if (batch_size // grad_accum) % ways:
        raise ConfigError(
            f"data.batch_size={batch_size} / loop.grad_accum={grad_accum} must be "
            f"divisible by the data x fsdp x expert mesh size {ways}"
        )
