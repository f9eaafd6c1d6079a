"""A memory planner: bytes per device for a preset, mesh, batch, sequence length, dtype and remat.

Parameters, gradients and optimizer state are exact (shapes and the rule table's shardings).
Activations follow a per-token model of what the backward pass keeps alive under each remat policy;
``tests/sharding/test_planner.py`` checks the totals against XLA's compiled memory analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from jax.sharding import AbstractMesh

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.models.model import Model
from llmjax.sharding.mesh import MeshConfig
from llmjax.sharding.rules import BATCH_AXES, MESH_AXES, Rules, default_rules, get_rules, param_spec

# Optimizer state in units of the parameters' bytes (AdamW keeps two moments).
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0, "lion": 1, "adafactor": 0}


@dataclass(frozen=True)
class Plan:
    params: int
    grads: int
    optimizer: int
    activations: int
    devices: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def fits(self, hbm_bytes: float) -> bool:
        return self.total <= hbm_bytes

    def table(self, hbm_bytes: float | None = None) -> str:
        rows = [
            ("parameters", self.params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("total", self.total),
        ]
        lines = [f"{'per device':<16}{'GiB':>10}"]
        lines += [f"{name:<16}{b / 2**30:>10.3f}" for name, b in rows]
        if hbm_bytes:
            verdict = "fits" if self.fits(hbm_bytes) else "does NOT fit"
            lines.append(
                f"{verdict} in {hbm_bytes / 2**30:.1f} GiB "
                f"({100 * self.total / hbm_bytes:.0f}% used)"
            )
        return "\n".join(lines)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return AbstractMesh(shape, MESH_AXES)
    except TypeError:  # older signature: a tuple of (name, size) pairs
        return AbstractMesh(tuple(zip(MESH_AXES, shape, strict=True)))


def _param_bytes_per_device(model, mesh, rules: Rules) -> int:
    from llmjax.sharding import _paths  # local: avoids an import cycle at package import

    names = _paths(model.param_axes())
    total = 0
    for path, leaf in _paths(model.abstract_params()).items():
        spec = param_spec(path, names[path], leaf.shape, mesh, rules)
        ways = 1
        for axis in spec:
            for a in (axis,) if isinstance(axis, str) else tuple(axis or ()):
                ways *= mesh.shape[a]
        total += int(np.prod(leaf.shape)) * leaf.dtype.itemsize // ways
    return total


def activation_bytes(cfg: ModelConfig, tokens: int, seq_len: int, tp: int, remat: str) -> int:
    """Bytes kept for the backward pass (plus the transient peak of one layer) for ``tokens``."""
    b = np.dtype(dtype_of(cfg.dtype)).itemsize
    D, H, K, C = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    F, V = cfg.resolved_mlp_dim, cfg.vocab_size
    h, k, f = max(H // tp, 1), max(K // tp, 1), max(F // tp, 1)
    gated = 2 if cfg.gated_mlp else 1
    # One layer, per token: norm inputs and outputs, residuals and projections (8 x D); q/k/v
    # before and after RoPE (which works in float32); the attention output; the MLP's hidden
    # activations with the inputs of their derivatives; the float32 attention logits and
    # probabilities that the XLA path materialises (2 x heads x keys) and the boolean mask.
    layer = b * (8 * D + 2 * (h + 2 * k) * C + h * C + (gated + 4) * f) + 4 * 2 * (h + k) * C
    if cfg.attention_impl == "xla":
        layer += (4 * 2 * h + 1) * seq_len
    else:  # flash kernels keep only the output and a float32 log-sum-exp per head
        layer += 4 * h
    if cfg.post_norms:  # Gemma's second pair of norms: inputs and outputs
        layer += 4 * D * b
    if cfg.qk_norm:
        layer += 2 * (h + k) * C * b
    dots = b * ((h + 2 * k) * C + 2 * D + (gated + 1) * f)  # projection outputs only
    saved = {"none": layer, "dots": dots, "full": b * D}[remat]
    per_token = cfg.n_layers * saved + (0 if remat == "none" else layer)
    # Float32 logits and their gradient (the vocabulary splits over tensor).
    per_token += 2 * 4 * max(V // tp, 1)
    return tokens * per_token


def plan(
    cfg: ModelConfig,
    mesh: str | MeshConfig | dict,
    *,
    batch_size: int,
    seq_len: int,
    rules: str | Rules = "fsdp",
    remat: str | None = None,
    optimizer: str = "adamw",
) -> Plan:
    """Estimate bytes per device for one training step of ``cfg`` on ``mesh``."""
    if isinstance(mesh, str):
        mesh = MeshConfig.parse(mesh)
    if isinstance(mesh, MeshConfig):
        free = [a for a in MESH_AXES if getattr(mesh, a) == -1]
        if free:
            raise ValueError(f"the planner needs every mesh axis size; {free} is -1")
        sizes = {a: getattr(mesh, a) for a in MESH_AXES}
    else:
        sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    rules = get_rules(rules)
    remat = remat or cfg.remat
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_MOMENTS)}")
    batch_ways = math.prod(sizes[a] for a in BATCH_AXES)
    if batch_size % batch_ways:
        raise ValueError(
            f"batch size {batch_size} is not divisible by data x fsdp x expert = {batch_ways}"
        )
    model = Model(cfg.replace(remat=remat))
    params = _param_bytes_per_device(model, abstract_mesh(sizes), rules)
    tp = sizes["tensor"] if "tensor" in _mesh_axes_used(rules) else 1
    tokens = batch_size // batch_ways * max(seq_len // sizes["sequence"], 1)
    activations = activation_bytes(model.config, tokens, seq_len, tp, remat)
    # The embedding table is gathered whole for the token lookup when it is sharded; sharded only
    # over fsdp, its gradient is also built whole before the reduce-scatter.
    table = cfg.vocab_size * cfg.d_model * np.dtype(dtype_of(cfg.param_dtype)).itemsize
    if tp > 1 and rules.params.get(axes.VOCAB):
        activations += table
    elif sizes["fsdp"] > 1 and rules.params.get(axes.EMBED):
        activations += 2 * table
    return Plan(
        params=params,
        grads=params,
        optimizer=OPTIMIZER_MOMENTS[optimizer] * params,
        activations=activations,
        devices=math.prod(sizes.values()),
    )


def _mesh_axes_used(rules: Rules) -> set[str]:
    used = set()
    for axis in rules.params.values():
        used.update((axis,) if isinstance(axis, str) else axis)
    return used


def main(argv=None) -> int:
    """``llmjax plan``: bytes per device of a training step, and whether it fits."""
    import argparse

    from llmjax import presets

    ap = argparse.ArgumentParser(prog="llmjax plan", description=main.__doc__)
    ap.add_argument("--preset", required=True, help="model preset, e.g. llama3-8b")
    ap.add_argument(
        "--mesh", default="data=1", help="axis=size pairs, e.g. fsdp=8 or fsdp=4,tensor=2"
    )
    ap.add_argument("--rules", default=None, help="parallelism preset (default: from the mesh)")
    ap.add_argument("--batch", type=int, required=True, help="global batch size (sequences)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    ap.add_argument("--param-dtype", default=None)
    ap.add_argument("--remat", default=None, choices=["none", "dots", "full"])
    ap.add_argument("--attention-impl", default=None, choices=["xla", "cudnn", "pallas"])
    ap.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_MOMENTS))
    ap.add_argument("--hbm", type=float, default=None, help="device memory in GiB, e.g. 80 or 95")
    args = ap.parse_args(argv)
    cfg = presets.get(args.preset)
    changes = {
        k: v
        for k, v in [
            ("dtype", args.dtype),
            ("param_dtype", args.param_dtype),
            ("attention_impl", args.attention_impl),
        ]
        if v
    }
    cfg = cfg.replace(**changes) if changes else cfg
    mesh_cfg = MeshConfig.parse(args.mesh)
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    rules = args.rules or default_rules(sizes)
    p = plan(
        cfg,
        mesh_cfg,
        batch_size=args.batch,
        seq_len=args.seq_len,
        rules=rules,
        remat=args.remat,
        optimizer=args.optimizer,
    )
    print(
        f"{cfg.name}: {Model(cfg).num_params():,} parameters; mesh {args.mesh} ({p.devices} devices), "
        f"rules {rules}, batch {args.batch} x {args.seq_len}, remat {args.remat or cfg.remat}, "
        f"{cfg.param_dtype} params / {cfg.dtype} compute"
    )
    print(p.table(args.hbm * 2**30 if args.hbm else None))
    return 0
