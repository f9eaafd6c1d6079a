"""Parallelism presets: short tables from logical axis names to mesh axes.

Mesh axes, outermost first: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters, gradients and optimizer state sharded), ``expert`` (mixture-of-experts), ``sequence``
(activations split along the sequence) and ``tensor`` (Megatron-style splits of heads, MLP and
vocabulary; innermost, so it lands on the fastest links). The batch always splits over
``data x fsdp x expert``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from jax.sharding import Mesh, PartitionSpec

from llmjax import axes
from llmjax.errors import LlmjaxError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "expert", "sequence", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")


class ShardingError(LlmjaxError, ValueError):
    """A mesh or rule table that cannot shard a parameter or batch as asked."""


@dataclass(frozen=True)
class Rules:
    """Logical name -> mesh axis (or tuple of axes) for parameters and for activations.

    Dimensions named in ``replicate_if_indivisible`` stay whole when the mesh does not divide them
    (GPT-2's odd vocabulary, one KV head under tensor parallelism): the standard, cheap fallback.
    Any other dimension the mesh does not divide is an error.
    """

    name: str
    params: Mapping[str, str | tuple[str, ...]]
    activations: Mapping[str, str | tuple[str, ...]]
    replicate_if_indivisible: frozenset[str] = field(
        default_factory=lambda: frozenset({axes.VOCAB, axes.KV_HEADS})
    )


_BATCH = {axes.ACT_BATCH: BATCH_AXES, axes.ACT_LENGTH: "sequence"}
_FSDP = {axes.EMBED: "fsdp"}
_TP = {axes.HEADS: "tensor", axes.KV_HEADS: "tensor", axes.MLP: "tensor", axes.VOCAB: "tensor"}
_TP_ACT = {
    axes.ACT_HEADS: "tensor",
    axes.ACT_KV_HEADS: "tensor",
    axes.ACT_MLP: "tensor",
    axes.ACT_VOCAB: "tensor",
}
_EP = {axes.EXPERTS: "expert"}
_EP_ACT = {axes.ACT_EXPERTS: "expert"}

PRESETS: dict[str, Rules] = {
    r.name: r
    for r in [
        Rules("dp", {}, _BATCH),
        Rules("fsdp", _FSDP, _BATCH),
        Rules("tp", _TP, {**_BATCH, **_TP_ACT}),
        Rules("fsdp_tp", {**_FSDP, **_TP}, {**_BATCH, **_TP_ACT}),
        Rules("ep", {**_FSDP, **_EP}, {**_BATCH, **_EP_ACT}),
        Rules("ep_tp", {**_FSDP, **_EP, **_TP}, {**_BATCH, **_TP_ACT, **_EP_ACT}),
    ]
}


def get_rules(rules: str | Rules) -> Rules:
    if isinstance(rules, Rules):
        return rules
    if rules not in PRESETS:
        raise ShardingError(f"unknown parallelism preset {rules!r}; presets: {sorted(PRESETS)}")
    return PRESETS[rules]


def _group(axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis or ())


def param_spec(path: str, names, shape, mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The PartitionSpec of one parameter; raises if the mesh does not divide a dimension."""
    spec = axes.logical_to_spec(names, rules.params)
    out = []
    for name, dim, axis in zip(names, shape, tuple(spec), strict=True):
        group = tuple(a for a in _group(axis) if mesh.shape.get(a, 1) > 1)
        ways = math.prod(mesh.shape[a] for a in group)
        if ways > 1 and dim % ways:
            if name in rules.replicate_if_indivisible:
                log.info(
                    "%s: %s=%d not divisible by %s (%d ways); replicated",
                    path,
                    name,
                    dim,
                    "x".join(group),
                    ways,
                )
                group = ()
            else:
                raise ShardingError(
                    f"parameter {path} of shape {tuple(shape)}: dimension {name!r} ({dim}) is not "
                    f"divisible by mesh axis {'x'.join(group)} of size {ways} under rules "
                    f"{rules.name!r}; choose a mesh whose {'x'.join(group)} size divides {dim}"
                )
        out.append(None if not group else group[0] if len(group) == 1 else group)
    return PartitionSpec(*out)


def default_rules(sizes: dict[str, int]) -> str:
    """The parallelism preset a mesh implies: FSDP and/or tensor axes in use, else data."""
    fsdp, tensor = sizes.get("fsdp", 1) > 1, sizes.get("tensor", 1) > 1
    if sizes.get("expert", 1) > 1:
        return "ep_tp" if tensor else "ep"
    return {(True, True): "fsdp_tp", (False, True): "tp", (True, False): "fsdp"}.get(
        (fsdp, tensor), "dp"
    )
