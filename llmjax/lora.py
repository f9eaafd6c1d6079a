"""LoRA: low-rank adapters kept in their own pytree, applied inside the layers.

    cfg = LoraConfig(rank=8, alpha=16.0)
    adapters = init_lora(model, cfg, key)                  # the only trainable tree
    logits = model.apply(apply_lora(params, adapters, cfg), tokens)

For a targeted weight ``W`` with input dims ``I...`` and output dims ``O...`` (as
``linear_input_axes`` decides; the input dims always lead), the adapter is ``a [I..., R]`` and
``b [R, O...]`` (float32), and the model computes ``x . W + scale * (dropout(x) . a) . b`` with
``scale = alpha / R`` (``alpha / sqrt(R)`` with ``rslora``), PEFT's forward: ``apply_lora`` puts a
``LoraWeight`` where each targeted weight was, and the layers' projections
(``llmjax.layers.params.project``) compute the two products without ever forming
``W + scale * a . b``, so no merged copy of the model is alive during training. ``b`` starts at
zero, so training starts exactly at the base model. The base may be quantized
(``quantize(model, params, "nf4")``): each ``QuantizedTensor`` is dequantized inside its layer and
again in the backward pass instead of being kept, which is QLoRA. ``merge`` forms the merged
weights, to export or serve.

Parameters are named by dotted paths of their keys (``layers.3.attn.wq``, ``lm_head``), the names
``LoraConfig.targets`` is matched against; adapters are a nested dict with the parameters' own
keys: ``{"layers": {3: {"attn": {"wq": {"a": ..., "b": ...}}}}}``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from llmjax.errors import ConfigError, InputError
from llmjax.inference.quantize import QuantizedTensor, linear_input_axes
from llmjax.layers.params import flat_einsum
from llmjax.models.scan import is_stacked, selects

# Every attention and MLP projection of every layer; not the output head or the embeddings.
DEFAULT_TARGETS = r"layers\.\d+\.(attn\.(wq|wk|wv|wo)|mlp\.(gate|up|down))"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Rank, scaling and which weights get adapters (``re.fullmatch`` on dotted parameter paths)."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = DEFAULT_TARGETS
    rslora: bool = False
    dropout: float = 0.0  # on the adapter's input, during training only (PEFT's lora_dropout)

    def __post_init__(self):
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout={self.dropout!r}: must be in [0, 1), e.g. 0.05")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ConfigError(f"lora rank={self.rank!r}: must be a positive int, e.g. 8")
        alpha = self.alpha
        if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
            raise ConfigError(f"lora alpha={alpha!r}: must be a positive number, e.g. 2 * rank")
        if not math.isfinite(alpha):
            raise ConfigError(f"lora alpha={alpha!r}: must be finite, e.g. 2 * rank")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"lora rslora={self.rslora!r}: must be True or False")
        if not isinstance(self.targets, str):
            raise ConfigError(
                f"lora targets={self.targets!r}: must be a regex string over dotted parameter "
                r"paths, e.g. r'layers\.\d+\.attn\.(wq|wv)'"
            )
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(
                f"lora targets={self.targets!r} is not a valid regex ({e}); fix the pattern"
            ) from e

    @property
    def scale(self) -> float:
        """The factor on ``a . b``: alpha / rank, or alpha / sqrt(rank) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class ParamCount(NamedTuple):
    trainable: int  # adapter values
    total: int  # base parameters plus adapter values

    @property
    def fraction(self) -> float:
        return self.trainable / self.total


# Paths --------------------------------------------------------------------------------------------
def _leaves(tree, keys=()):
    """``(keys, leaf)`` pairs of a nested dict, in its order; a quantized weight is one leaf."""
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _leaves(v, (*keys, k))]
    return [(keys, tree)]


def dotted(keys) -> str:
    return ".".join(str(k) for k in keys)


def nest(items) -> dict:
    """A nested dict from ``(keys, value)`` pairs (the inverse of walking it)."""
    tree: dict = {}
    for keys, value in items:
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return tree


def linear_params(model) -> dict[str, tuple[tuple, tuple, int]]:
    """Every weight LoRA can adapt: dotted path -> (keys, shape, number of leading input dims).

    A scanned model's stacked weight (``blocks.j.*``, shape ``[R, ...]``) counts its input dims
    after the stack axis, and its adapter is stacked too: ``a [R, I..., r]``, ``b [R, r, O...]``.
    """
    shapes = dict(_leaves(model.abstract_params()))
    out = {}
    for keys, names in _leaves(model.param_axes()):
        in_axes = linear_input_axes(tuple(names)[_lead(keys) :])
        if in_axes is not None:
            out[dotted(keys)] = (keys, tuple(shapes[keys].shape), len(in_axes))
    return out


def _lead(keys) -> int:
    """1 for a scanned model's stacked weight (its leading axis holds the repeats), else 0."""
    return int(is_stacked(keys))


def fold_paths(paths) -> str:
    """Paths with layer indices folded: ``layers.N.attn.wq, ..., lm_head``."""
    folded = dict.fromkeys(re.sub(r"^layers\.\d+\.", "layers.N.", p) for p in paths)
    return ", ".join(folded)


def lora_targets(model, cfg: LoraConfig) -> tuple[str, ...]:
    """The dotted paths ``cfg.targets`` selects; ConfigError unless all are linear and some are."""
    pattern = re.compile(cfg.targets)
    linear = linear_params(model)
    chosen = [dotted(k) for k, _ in _leaves(model.abstract_params())]
    chosen = [p for p in chosen if selects(model.config, pattern, p, "lora targets")]
    wrong = [p for p in chosen if p not in linear]
    if wrong:
        raise ConfigError(
            f"lora targets={cfg.targets!r} selects {fold_paths(wrong)}, which are not linear "
            f"projections (embeddings, norms and biases get no adapters); select among "
            f"{fold_paths(linear)}"
        )
    if not chosen:
        raise ConfigError(
            f"lora targets={cfg.targets!r} selects no parameter of {model.config.name!r}; it is "
            f"matched whole against dotted paths, select among {fold_paths(linear)}"
        )
    return tuple(chosen)


# Adapters -----------------------------------------------------------------------------------------
def init_lora(model, cfg: LoraConfig, key) -> dict:
    """Fresh adapters: ``a`` as PEFT draws it (uniform in +-1/sqrt(fan_in)), ``b`` zero.

    PEFT's default is torch's kaiming_uniform with a=sqrt(5) over the flattened input, whose
    bound is sqrt(6 / (1 + 5)) / sqrt(fan_in) = 1 / sqrt(fan_in).
    """
    linear = linear_params(model)
    items = []
    for i, path in enumerate(lora_targets(model, cfg)):
        keys, shape, n_in = linear[path]
        stack, shape = shape[: _lead(keys)], shape[_lead(keys) :]
        bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
        a = jax.random.uniform(
            jax.random.fold_in(key, i),
            (*stack, *shape[:n_in], cfg.rank),
            jnp.float32,
            -bound,
            bound,
        )
        b = jnp.zeros((*stack, cfg.rank, *shape[n_in:]), jnp.float32)
        items.append((keys, {"a": a, "b": b}))
    return nest(items)


def lora_axes(model, cfg: LoraConfig) -> dict:
    """Logical axis names shaped like the adapters: the weight's names for I/O, None for R."""
    linear = linear_params(model)
    names = dict(_leaves(model.param_axes()))
    items = []
    for path in lora_targets(model, cfg):
        keys, _, n_in = linear[path]
        w, k = tuple(names[keys]), _lead(keys)
        a, b = (*w[: k + n_in], None), (*w[:k], None, *w[k + n_in :])
        items.append((keys, {"a": a, "b": b}))
    return nest(items)


def count_trainable(model, adapters) -> ParamCount:
    """Adapter values against everything (base plus adapters), as PEFT reports it."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(adapters))
    return ParamCount(trainable=n, total=model.num_params() + n)


def adapter_pairs(adapters) -> dict[str, tuple[tuple, object, object]]:
    """Dotted path -> (keys, a, b), or an InputError if ``adapters`` is not shaped as init_lora's."""

    def bad(where: str):
        return InputError(
            f"adapters{where} is not an adapter tree; pass the nested dict init_lora returns, "
            "with {'a': [in..., R], 'b': [R, out...]} at each adapted weight"
        )

    if not isinstance(adapters, dict) or not adapters:
        raise bad("")
    out = {}

    def walk(node, keys):
        if isinstance(node, dict) and set(node) == {"a", "b"}:
            a, b = node["a"], node["b"]
            if not (hasattr(a, "shape") and hasattr(b, "shape")) or a.ndim < 2 or b.ndim < 2:
                raise bad(f" at {dotted(keys)!r}")
            out[dotted(keys)] = (keys, a, b)
        elif isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, (*keys, k))
        else:
            raise bad(f" at {dotted(keys)!r}")

    walk(adapters, ())
    return out


def _check_pair(path: str, a, b, shape: tuple, rank: int) -> None:
    k = _lead(path)
    n_in = a.ndim - 1 - k
    fits = tuple(a.shape[:k]) == tuple(b.shape[:k]) == tuple(shape[:k])
    if a.shape[-1] != rank or b.ndim <= k or b.shape[k] != rank:
        raise InputError(
            f"adapter {path!r} has rank {a.shape[-1]} (a) / {b.shape[min(k, b.ndim - 1)]} (b) but "
            f"the LoraConfig says rank={rank}; pass the LoraConfig the adapters were built with"
        )
    layer = tuple(a.shape[k:-1]) + tuple(b.shape[k + 1 :])
    if not fits or layer != tuple(shape[k:]) or not 0 < n_in < len(shape) - k:
        form = (
            "a [repeats, in..., R] and b [repeats, R, out...]"
            if k
            else "a [in..., R] and b [R, out...]"
        )
        raise InputError(
            f"adapter {path!r} (a {list(a.shape)}, b {list(b.shape)}) does not fit its weight of "
            f"shape {list(shape)}; it must be {form} for this model's weight"
        )


def check_adapters(model, adapters, cfg: LoraConfig) -> dict[str, tuple[tuple, object, object]]:
    """``adapter_pairs`` after checking them against the model: exactly cfg's targets, fitting."""
    pairs = adapter_pairs(adapters)
    targets = lora_targets(model, cfg)
    linear = linear_params(model)
    if set(pairs) != set(targets):
        extra = sorted(set(pairs) - set(targets))
        missing = [p for p in targets if p not in pairs]
        raise InputError(
            f"adapters do not match lora targets={cfg.targets!r} on {model.config.name!r} "
            f"(unexpected: {extra[:6]}, missing: {missing[:6]}); pass the LoraConfig the adapters "
            "were built with"
        )
    for path, (_, a, b) in pairs.items():
        _, shape, n_in = linear[path]
        _check_pair(path, a, b, shape, cfg.rank)
        if a.ndim - 1 - _lead(path) != n_in:
            raise InputError(
                f"adapter {path!r}: a has {a.ndim - 1} input dims but the weight has {n_in}; "
                "a must be [in..., R] with the weight's input dims"
            )
    return {p: pairs[p] for p in targets}


# Forward ------------------------------------------------------------------------------------------
def delta(a, b, scale: float) -> jax.Array:
    """``scale * (a . b)`` in float32, shaped like the weight ``[I..., O...]``."""
    rank = a.shape[-1]
    ab = jnp.matmul(
        a.reshape(-1, rank).astype(jnp.float32),
        b.reshape(rank, -1).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,  # the update can be far smaller than the weight
    )
    return scale * ab.reshape(*a.shape[:-1], *b.shape[1:])


def _delta(path: str, a, b, scale: float) -> jax.Array:
    """``delta`` of a weight, per repeat for a scanned model's stacked one."""
    if _lead(path):
        return jax.vmap(delta, in_axes=(0, 0, None))(a, b, scale)
    return delta(a, b, scale)


def _full_shape(w) -> tuple:
    """A weight's shape; a stacked ``QuantizedTensor`` keeps one layer's in its static fields."""
    if isinstance(w, QuantizedTensor) and w.stacked:
        return (w.q.shape[0], *w.shape)
    return tuple(w.shape)


def _pairs_and_leaves(base, adapters, cfg: LoraConfig):
    """The adapters by dotted path and the base's ``(keys, leaf)`` pairs, checked to belong."""
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"cfg is a {type(cfg).__name__}; pass the LoraConfig of the adapters")
    if not isinstance(base, dict):
        raise InputError(
            f"params is a {type(base).__name__}; pass the nested dict of arrays that model.init, "
            "from_hf or quantize returns"
        )
    pairs = adapter_pairs(adapters)
    leaves = _leaves(base)
    absent = sorted(set(pairs) - {dotted(k) for k, _ in leaves})
    if absent:
        raise InputError(
            f"adapters name {absent[:6]}, which params do not hold; pass the params of the "
            "model the adapters were built for"
        )
    return pairs, leaves


def _combine(base, adapters, cfg: LoraConfig, sign: float, freeze: bool) -> dict:
    pairs, leaves = _pairs_and_leaves(base, adapters, cfg)
    items = []
    for keys, w in leaves:
        if isinstance(w, QuantizedTensor):
            w = w.dequantize()
        if freeze:
            w = jax.lax.stop_gradient(w)
        pair = pairs.get(dotted(keys))
        if pair is not None:
            _, a, b = pair
            _check_pair(dotted(keys), a, b, w.shape, cfg.rank)
            update = _delta(dotted(keys), a, b, cfg.scale)
            w = (w.astype(jnp.float32) + sign * update).astype(w.dtype)
        items.append((keys, w))
    return nest(items)


@struct.dataclass
class LoraWeight:
    """A targeted weight in the forward pass: the frozen base (an array or a ``QuantizedTensor``)
    and its adapter. Layers call ``project``; ``w[...]`` gives the merged weight for any other
    reader."""

    base: object
    a: jax.Array
    b: jax.Array
    key: jax.Array | None  # dropout randomness; None: no dropout (evaluation, sampling)
    scale: float = struct.field(pytree_node=False)
    dropout: float = struct.field(pytree_node=False, default=0.0)

    @property
    def shape(self):
        return _full_shape(self.base)

    @property
    def dtype(self):
        return jnp.dtype(self.base.dtype)

    def __getitem__(self, idx):
        w = self.base.dequantize() if isinstance(self.base, QuantizedTensor) else self.base
        # A scanned model's stacked weight outside its scan (sliced inside it, per layer).
        stacked = self.a.ndim + self.b.ndim - 2 > w.ndim
        update = _delta("blocks" if stacked else "", self.a, self.b, self.scale)
        return (w.astype(jnp.float32) + update).astype(w.dtype)[idx]

    def project(self, eq: str, x, dtype):
        """``einsum(eq, x, W) + scale * einsum(dropout(x) . a . b)``, PEFT's LoRA forward."""
        n_in = self.a.ndim - 1
        if isinstance(self.base, QuantizedTensor):
            y = self.base.project(eq, x, dtype)
        else:
            y = flat_einsum(eq, x, self.base.astype(dtype), n_in)
        lhs, out = eq.split("->")
        x_spec, w_spec = lhs.split(",")
        ins, outs = w_spec[:n_in], w_spec[n_in:]
        rows = "".join(c for c in x_spec if c not in ins)
        if self.key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        xa = jnp.einsum(f"{x_spec},{ins}R->{rows}R", x, self.a.astype(dtype))
        return y + self.scale * jnp.einsum(f"{rows}R,R{outs}->{out}", xa, self.b.astype(dtype))


def apply_lora(base, adapters, cfg: LoraConfig, key=None) -> dict:
    """Parameters for ``model.apply``: each targeted weight becomes a ``LoraWeight``.

    The base is frozen: gradients flow to ``adapters`` only (a gradient taken with respect to
    ``base`` is zero). Quantized leaves stay quantized until their layer reads them (QLoRA).
    ``key`` turns on ``cfg.dropout`` (training); without it there is no dropout.
    """
    pairs, leaves = _pairs_and_leaves(base, adapters, cfg)
    items = []
    for i, (keys, w) in enumerate(leaves):
        w = jax.lax.stop_gradient(w)
        pair = pairs.get(dotted(keys))
        if pair is not None:
            _, a, b = pair
            _check_pair(dotted(keys), a, b, _full_shape(w), cfg.rank)
            k = None if key is None or not cfg.dropout else jax.random.fold_in(key, i)
            if k is not None and _lead(keys):  # one key per repeat, for the scan to slice
                k = jax.random.split(k, a.shape[0])
            w = LoraWeight(w, a, b, k, cfg.scale, cfg.dropout)
        items.append((keys, w))
    return nest(items)


def merge(base, adapters, cfg: LoraConfig) -> dict:
    """The merged float parameters (every quantized leaf dequantized), to export or serve."""
    return _combine(base, adapters, cfg, 1.0, freeze=False)


def unmerge(merged, adapters, cfg: LoraConfig) -> dict:
    """``merged`` with each adapter's update subtracted: the base again, up to float rounding."""
    return _combine(merged, adapters, cfg, -1.0, freeze=False)


__all__ = [
    "DEFAULT_TARGETS",
    "LoraConfig",
    "LoraWeight",
    "ParamCount",
    "apply_lora",
    "check_adapters",
    "count_trainable",
    "init_lora",
    "lora_axes",
    "lora_targets",
    "merge",
    "unmerge",
]
