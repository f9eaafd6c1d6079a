"""What a recipe hands the training loop: a ``Task``.

The loop knows nothing of pretraining, fine-tuning or adapters. A recipe gives it

- ``params``: the initial trainable parameters, either a function of a PRNG key (a fresh model,
  traced under ``jax.jit`` so every shard is created in place) or a tree of arrays (pretrained
  weights, adapters), with their logical axis names ``axes``;
- ``frozen``: named pytrees the step reads but never updates, donates or saves (a base model, a
  reference, a teacher), with ``frozen_axes`` (``None`` for a tree: replicated);
- ``loss`` (see ``llmjax.losses``) and optionally ``eval_loss`` (without regularisers);
- ``train``: the batch iterator (``next``, ``state()``, ``restore(state)``, ``local_rows``);
  ``heldout(batch_size, max_batches)``: held-out batches for the eval loss (None: none, as for
  RL, whose evaluation is ``evaluate``'s);
- ``evaluate(params, frozen) -> dict`` of further eval metrics (exact match, ...);
- ``identity``: what a checkpoint must have been trained with to be resumed (the tokenizer's and
  the data's fingerprints, the base's hash, ...), recorded in every checkpoint and compared on
  resume; ``model`` the model config whose differences are named when they disagree;
  ``start_metrics``: numbers logged once at step 0 (trainable parameter counts, ...);
- ``eval_perplexity``: False when the loss is not a next-token NLL (preference losses), so no
  perplexity is derived from it;
- ``rollout(params, frozen, batch, key, step) -> (batch, metrics)``: run on the host before each step
  with the current (sharded) parameters, it turns the data's batch into the step's batch, e.g.
  sampling completions and scoring them with Python reward functions (RL). ``key`` is a function
  of the seed and the step only, so a resumed run samples what the interrupted one would have;
- ``updates_per_batch``: optimizer updates per step on the same batch (GRPO's
  ``num_iterations``); the learning-rate schedule counts updates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import sharding
from llmjax.config import ConfigError
from llmjax.sharding import ShardingError


@dataclass
class Task:
    params: Callable | dict
    axes: dict
    loss: Callable
    train: object
    heldout: Callable[[int, int], Iterable[dict]] | None  # None: no held-out loss (RL)
    model: object = None  # ModelConfig of the model being trained
    frozen: dict = field(default_factory=dict)
    frozen_axes: dict = field(default_factory=dict)
    eval_loss: Callable | None = None
    evaluate: Callable[[dict, dict], dict] | None = None
    identity: dict = field(default_factory=dict)
    start_metrics: dict = field(default_factory=dict)  # logged at step 0 of a fresh run
    eval_perplexity: bool = True
    rollout: Callable | None = None
    updates_per_batch: int = 1


def tree_shardings(axes, abstract, mesh, rules):
    """NamedShardings for ``abstract`` (shape leaves) from its logical ``axes``.

    An ``axes`` subtree that is ``None`` is replicated whole (quantized weights, small heads).
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    if axes is None:
        return jax.tree.map(lambda _: replicated, abstract)
    rule_table = sharding.get_rules(rules)

    def visit(a, names, path):
        if isinstance(a, dict):
            return {k: visit(a[k], None if names is None else names[k], f"{path}/{k}") for k in a}
        if names is None or not hasattr(a, "shape"):
            return jax.tree.map(lambda _: replicated, a)
        try:
            spec = sharding.param_spec(path.lstrip("/"), names, a.shape, mesh, rule_table)
        except ShardingError as e:
            raise ConfigError(str(e)) from None
        return NamedSharding(mesh, spec)

    return visit(abstract, axes, "")


def place(tree, shardings):
    """Host or device arrays onto their shardings (each process passes the same values)."""

    def put(x, s):
        if isinstance(x, jax.Array) and x.is_fully_addressable and s.is_fully_addressable:
            return jax.device_put(x, s)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(put, tree, shardings)


def _paths(tree) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [".".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def split_trainable(params: dict, pattern: str, config=None) -> tuple[dict, dict]:
    """``(trainable, rest)``: the leaves whose dotted path ``re.fullmatch`` es ``pattern``, and the
    others, as two nested dicts (``join`` puts them back together).

    With the model's ``config``, a scanned model's stacked block is matched by its per-layer
    paths (``layers.i.*``, ``llmjax.models.scan.selects``), as the pattern is written.
    """
    from llmjax.models.scan import selects

    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"trainable pattern {pattern!r} is not a regular expression: {e}") from e

    def visit(p, prefix):
        if isinstance(p, dict):
            parts = {k: visit(v, f"{prefix}{k}.") for k, v in p.items()}
            take = {k: t for k, (t, _) in parts.items() if t is not None}
            keep = {k: r for k, (_, r) in parts.items() if r is not None}
            return take or None, keep or None
        path = prefix[:-1]
        if config is not None:
            hit = selects(config, regex, path, "trainable pattern")
        else:
            hit = regex.fullmatch(path) is not None
        return (p, None) if hit else (None, p)

    trainable, rest = visit(params, "")
    if not trainable:
        examples = ", ".join(_paths(params)[:4])
        raise ConfigError(
            f"trainable pattern {pattern!r} matches no parameter; paths look like {examples}"
        )
    return trainable, rest or {}


def join(a: dict, b: dict) -> dict:
    """Two disjoint nested dicts as one (the inverse of ``split_trainable``)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = join(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def subtree(tree: dict, like: dict) -> dict:
    """The part of ``tree`` with the keys of ``like`` (axes of a split parameter tree)."""
    return {k: subtree(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}
