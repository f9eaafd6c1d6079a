"""Meshes from a config: ``data=2,fsdp=-1,tensor=2`` (one axis may be -1, "the rest")."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import jax
import numpy as np
from jax.sharding import Mesh

from llmjax.sharding.rules import MESH_AXES, ShardingError


@dataclass(frozen=True)
class MeshConfig:
    """Size of each mesh axis; at most one may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def parse(cls, spec: str | None) -> MeshConfig:
        """``"data=2,fsdp=-1"``: named axes given, the others 1 (all ``data`` when empty)."""
        if not spec:
            return cls()
        given = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            name = name.strip()
            if not sep:
                raise ShardingError(f"mesh {spec!r}: {part!r} is not axis=size")
            if name not in MESH_AXES:
                raise ShardingError(f"mesh {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
            try:
                given[name] = int(value)
            except ValueError:
                raise ShardingError(
                    f"mesh {spec!r}: size {value!r} of {name} is not an int"
                ) from None
        return cls(**{a: given.get(a, 1) for a in MESH_AXES})

    def sizes(self, num_devices: int) -> dict[str, int]:
        sizes = {f.name: getattr(self, f.name) for f in fields(self)}
        bad = [a for a, s in sizes.items() if s == 0 or s < -1]
        if bad:
            raise ShardingError(f"mesh axes {bad} must be positive or -1: {sizes}")
        free = [a for a, s in sizes.items() if s == -1]
        if len(free) > 1:
            raise ShardingError(f"mesh {sizes}: at most one axis may be -1, got {free}")
        known = math.prod(s for s in sizes.values() if s != -1)
        if free:
            if num_devices % known:
                raise ShardingError(
                    f"mesh {sizes}: the fixed axes ({known} devices) do not divide "
                    f"the {num_devices} devices"
                )
            sizes[free[0]] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ShardingError(
                f"mesh {sizes} has {math.prod(sizes.values())} devices but there are {num_devices}; "
                "make the sizes multiply to the device count or set one axis to -1"
            )
        return sizes

    def build(self, devices=None) -> Mesh:
        """A mesh over ``devices`` (default: all devices of all processes).

        Device order comes from ``jax.make_mesh``, which lays axes out along the physical topology
        (TPU torus, GPU NVLink islands), inner axes on the closest devices.
        """
        devices = list(jax.devices() if devices is None else devices)
        sizes = self.sizes(len(devices))
        shape = tuple(sizes[a] for a in MESH_AXES)
        auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        try:
            return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
        except (ValueError, NotImplementedError):
            # Topology-aware placement needs all devices of a known topology; fall back to order.
            return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)
