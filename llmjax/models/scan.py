"""Scanned layers: which layers repeat, and the stacked parameter layout that runs them as a scan.

With ``ModelConfig.scan_layers`` the decoder finds the longest run of layers that repeats with
some period P (Llama: every layer, P = 1; Gemma 2: local/global, P = 2; Gemma 3: five local and
one global, P = 6; a MoE model whose first layers are dense: the MoE layers after them) and runs
it as one ``jax.lax.scan`` whose step is P blocks. Each of those P blocks stores its parameters
once, stacked over the repeats along a leading ``layers`` axis:

    params["blocks"][j]   layer head + r * P + j of repeat r lives at index r     [R, ...]
    params["layers"][i]   every other layer, unrolled, under its own index i

A traced program then holds P blocks instead of n_layers, so compilation time and program size
do not grow with depth. Hugging Face checkpoints, PEFT adapters and quantization keep one tensor
per layer; ``stack_layers`` and ``unstack_layers`` convert whole trees (params, gradients) at that
boundary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.axes import LAYERS
from llmjax.config import ModelConfig
from llmjax.errors import ConfigError, InputError


@dataclass(frozen=True)
class ScanPlan:
    """Layers [head, head + period * repeats) are scanned; the rest run unrolled."""

    n_layers: int
    head: int = 0
    period: int = 1
    repeats: int = 0  # 0: nothing is scanned

    @property
    def stop(self) -> int:
        return self.head + self.period * self.repeats

    def scanned(self, i: int) -> bool:
        return self.head <= i < self.stop

    def layer(self, r: int, j: int) -> int:
        """The layer that repeat ``r`` runs as its ``j``-th block."""
        return self.head + r * self.period + j

    def position(self, i: int) -> tuple[int, int]:
        """``(r, j)`` of a scanned layer ``i``."""
        return divmod(i - self.head, self.period)

    @property
    def unrolled(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if not self.scanned(i))


@functools.lru_cache(maxsize=256)
def scan_plan(cfg: ModelConfig) -> ScanPlan:
    """The layers ``cfg`` scans: fewest unrolled layers, then the shortest period, then head.

    Layers repeat when their blocks are built alike: the same attention kind (global or local,
    which sets the window and RoPE) and the same feed-forward (dense or MoE).
    """
    L = cfg.n_layers
    if not cfg.scan_layers:
        return ScanPlan(L)
    sig = [(cfg.layer_kinds[i], cfg.is_moe_layer(i)) for i in range(L)]
    best, plan = None, ScanPlan(L)
    for head in range(L):
        for period in range(1, (L - head) // 2 + 1):
            unit = sig[head : head + period]
            repeats = 1
            while (
                head + (repeats + 1) * period <= L
                and sig[head + repeats * period : head + (repeats + 1) * period] == unit
            ):
                repeats += 1
            if repeats < 2:
                continue
            key = (L - repeats * period, period, head)
            if best is None or key < best:
                best, plan = key, ScanPlan(L, head, period, repeats)
    return plan


def _stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):  # abstract: the stack axis is never sharded
        s = xs[0].sharding
        if isinstance(s, NamedSharding):
            s = NamedSharding(s.mesh, PartitionSpec(None, *s.spec))
        return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype, sharding=s)
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack(xs)


def _row(x, r: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        s = x.sharding
        if isinstance(s, NamedSharding):
            s = NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=s)
    return x[r]


def _layout(tree) -> str:
    return "scanned" if isinstance(tree, dict) and "blocks" in tree else "unrolled"


def stack_layers(cfg: ModelConfig, tree: dict, partial: bool = False) -> dict:
    """A tree with one entry per layer (``layers.i``, as ``from_hf`` and an unrolled model give
    it) in the layout of ``cfg`` with ``scan_layers=True``: repeating layers stacked into
    ``blocks.j``. Works on any tree shaped like the params (gradients, optimizer moments).

    ``partial=True`` takes a tree that covers some layers (LoRA adapters): a block is stacked
    from every repeat of its layer or absent from all of them."""
    plan = scan_plan(cfg)
    if not plan.repeats:
        return tree
    layers = tree.get("layers") if isinstance(tree, dict) else None
    if partial and _layout(tree) == "unrolled" and layers is None:
        return tree
    if _layout(tree) != "unrolled" or not isinstance(layers, dict):
        raise InputError(
            f"stack_layers takes params with one entry per layer (params['layers'][i]); got a "
            f"{_layout(tree)} tree; pass the params of the unrolled model"
        )
    missing = [i for i in range(cfg.n_layers) if i not in layers]
    if missing and not partial:
        raise InputError(
            f"params['layers'] lacks layers {missing[:8]} of {cfg.name!r} (n_layers="
            f"{cfg.n_layers}); pass the params of a model with this config"
        )
    out = {k: v for k, v in tree.items() if k != "layers"}
    kept = {i: layers[i] for i in plan.unrolled if i in layers}
    blocks = {}
    for j in range(plan.period):
        parts = [layers.get(plan.layer(r, j)) for r in range(plan.repeats)]
        if all(p is None for p in parts):
            continue
        shapes = {jax.tree.structure(p) for p in parts if p is not None}
        if any(p is None for p in parts) or len(shapes) > 1:
            ids = [plan.layer(r, j) for r in range(plan.repeats)]
            raise InputError(
                f"layers {ids} of {cfg.name!r} are one stacked block under scan_layers=True, but "
                "the tree does not hold the same entries for each of them; give all of them the "
                "same entries, or use scan_layers=False"
            )
        blocks[j] = jax.tree.map(_stack, *parts)
    if kept:
        out["layers"] = kept
    if blocks:
        out["blocks"] = blocks
    return out


def unstack_layers(cfg: ModelConfig, tree: dict) -> dict:
    """The inverse of ``stack_layers``: one entry per layer again, ``layers.0 ... layers.L-1``."""
    plan = scan_plan(cfg)
    if not plan.repeats:
        return tree
    if _layout(tree) != "scanned":
        raise InputError(
            "unstack_layers takes params with stacked blocks (params['blocks'][j]); got an "
            f"unrolled tree; its layers are already one entry each for {cfg.name!r}"
        )
    blocks = tree["blocks"]
    if not set(blocks) <= set(range(plan.period)):
        raise InputError(
            f"params['blocks'] has entries {sorted(blocks)}, but {cfg.name!r} scans a period of "
            f"{plan.period} blocks; pass the params of a model with this config"
        )
    layers = dict(tree.get("layers", {}))
    for j, block in blocks.items():
        for r in range(plan.repeats):
            layers[plan.layer(r, j)] = jax.tree.map(lambda x, r=r: _row(x, r), block)
    out = {k: v for k, v in tree.items() if k != "blocks"}
    if layers:
        out["layers"] = {i: layers[i] for i in sorted(layers)}
    return out


def relayout(cfg: ModelConfig, tree, scanned: bool):
    """``tree`` with every params-shaped dict inside it (params, optimizer moments, adapters;
    arrays or ``ShapeDtypeStruct``) in the scanned (``scanned=True``) or unrolled layout of
    ``cfg``'s layers. A checkpoint saved in one layout restores into the other through this."""
    plan_cfg = cfg.replace(scan_layers=True)
    if not scan_plan(plan_cfg).repeats:
        return tree

    def walk(node):
        if isinstance(node, dict):
            node = {k: walk(v) for k, v in node.items()}
            if scanned and isinstance(node.get("layers"), dict) and "blocks" not in node:
                return stack_layers(plan_cfg, node, partial=True)
            if not scanned and "blocks" in node:
                return unstack_layers(plan_cfg, node)
            return node
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's states
            return type(node)(*map(walk, node))
        if isinstance(node, (tuple, list)):
            return type(node)(map(walk, node))
        return node

    return walk(tree)


def is_stacked(keys) -> bool:
    """Whether a parameter's key path (keys, ``jax.tree_util`` path entries or a dotted string)
    leads into the stacked blocks, whose leading axis holds the repeats."""
    keys = keys.split(".") if isinstance(keys, str) else keys
    return bool(keys) and getattr(keys[0], "key", keys[0]) == "blocks"


def layer_axes(names) -> tuple:
    """One layer's logical axis names: a stacked parameter's lead with ``layers``."""
    names = tuple(names)
    return names[1:] if names and names[0] == LAYERS else names


def layer_names(cfg: ModelConfig, path: str) -> tuple[str, ...]:
    """The per-layer dotted names a parameter path stands for: a stacked ``blocks.j.<rest>`` is
    ``layers.i.<rest>`` for the layer i of each repeat; any other path is itself."""
    parts = path.split(".")
    plan = scan_plan(cfg)
    if parts[0] != "blocks" or len(parts) < 3 or not plan.repeats:
        return (path,)
    j, rest = int(parts[1]), ".".join(parts[2:])
    return tuple(f"layers.{plan.layer(r, j)}.{rest}" for r in range(plan.repeats))


def selects(cfg: ModelConfig, regex, path: str, what: str) -> bool:
    """Whether ``regex`` (matched whole) selects parameter ``path``, by its per-layer names.

    Regexes that choose weights (LoRA targets, trainable patterns, quantization's keep) are
    written against per-layer paths (``layers.3.attn.wq``); a stacked block holds every repeat of
    its layer in one array, so the regex must select all of those layers or none.
    """
    names = layer_names(cfg, path)
    hits = [regex.fullmatch(n) is not None for n in names]
    if any(hits) and not all(hits):
        chosen = [n.split(".")[1] for n, h in zip(names, hits, strict=True) if h]
        left = [n.split(".")[1] for n, h in zip(names, hits, strict=True) if not h]
        raise ConfigError(
            f"{what} {regex.pattern!r} selects layers {chosen} of {path} but not {left}: "
            f"{cfg.name!r} has scan_layers=True, which stores these layers as one stacked array; "
            "select all of them or none, or use scan_layers=False (in sft, dpo and rl: "
            "--set scan_layers=false)"
        )
    return hits[0]
