"""Pairs of completions on the devices: their log-probs, and a frozen reference's computed once.

Batches hold pairs as ``[B, 2, T]`` (``llmjax.data.preference``); a forward pass reads them as
``[2B, T]`` rows, chosen rows first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import distributed, sharding
from llmjax.losses.chunked import DEFAULT_CHUNK
from llmjax.losses.core import target_logprobs
from llmjax.train import mesh as mesh_lib
from llmjax.train.task import place, tree_shardings

REFERENCE_FILE = "reference_logps.npz"
_SIDES = ("tokens", "targets", "positions", "segment_ids", "loss_mask")


def flat(batch) -> dict:
    """``[B, 2, T]`` sides as ``[2B, T]`` rows: chosen rows first, then rejected."""
    return {k: jnp.swapaxes(batch[k], 0, 1).reshape(-1, batch[k].shape[-1]) for k in _SIDES}


def as_pairs(x_R):
    """``[2B]`` per-row values back as ``[B, 2]`` (chosen, rejected)."""
    return x_R.reshape(2, -1).T


def pair_logps(model, params, batch, return_aux: bool = False, chunk: int | None = DEFAULT_CHUNK):
    """``(sums [B, 2], counts [B, 2])``: each side's completion log-prob and token count.

    ``chunk`` tokens per device are projected to the vocabulary at a time (``loop.ce_chunk``; 0
    forms the full logits), as in ``next_token_loss``. ``return_aux=True`` appends a
    mixture-of-experts model's router losses over both sides' rows
    (``llmjax.losses.core.apply_routed``; None for a dense model), which a trained policy's loss
    adds and a frozen reference has no use for.
    """
    rows = flat(batch)
    inputs = {"positions": rows["positions"], "segment_ids": rows["segment_ids"]}
    mask = rows["loss_mask"]
    logp, moe_aux = target_logprobs(
        model, params, rows["tokens"], rows["targets"], mask, chunk=chunk, return_aux=True, **inputs
    )
    sums = (logp * mask.astype(jnp.float32)).sum(-1)
    out = as_pairs(sums), as_pairs(mask.sum(-1))
    return (*out, moe_aux) if return_aux else out


def compute_reference(model, params, axes, batches, cfg) -> np.ndarray:
    """The summed completion log-probs ``[N, 2]`` of every pair ``batches`` yields, on the loop's
    mesh (``cfg.loop.mesh``): each process passes the same batches and gets every value."""
    mesh = mesh_lib.make_mesh(cfg.loop.mesh)
    rules = mesh_lib.rules_for(mesh, cfg.loop.rules)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    placed = place(params, tree_shardings(axes, abstract, mesh, rules))
    forward = jax.jit(lambda p, b: pair_logps(model, p, b, chunk=cfg.loop.ce_chunk)[0])
    B, rows = cfg.data.batch_size, distributed.process_rows(cfg.data.batch_size)
    out = []
    with sharding.activation_rules(mesh, rules):
        for batch in batches:
            n = len(batch["tokens"])
            # Every batch has the full size, so one compiled forward serves them all.
            fill = np.concatenate([np.arange(n), np.full(B - n, n - 1)])
            local = {k: batch[k][fill][rows] for k in _SIDES}
            values = forward(placed, sharding.shard_batch(local, mesh))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                values = multihost_utils.process_allgather(values, tiled=True)
            out.append(np.asarray(values)[:n])
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def cached_reference(cfg, model, params, axes, data, out_dir, key: dict, log):
    """``(train [N, 2], heldout [M, 2])`` reference log-probs, read from the run directory when
    computed there before for the same ``key``, else computed and stored."""
    path = Path(out_dir) / REFERENCE_FILE
    stamp = json.dumps(key, sort_keys=True)
    if path.is_file():
        with np.load(path) as f:
            if str(f["key"]) == stamp:
                return f["train"], f["heldout"]
        log(f"{path} was computed for another base or data; computing it again")
    n, m = len(data.train_pairs), len(data.heldout)
    log(f"reference log-probs: computing {n + m:,} pairs once")
    B = cfg.data.batch_size
    train_rows = (data.train_pairs.rows(np.arange(i, min(i + B, n))) for i in range(0, n, B))
    train_ref = compute_reference(model, params, axes, train_rows, cfg)
    held_ref = compute_reference(model, params, axes, data.heldout.batches(B), cfg)
    if distributed.is_main_process():
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, key=np.asarray(stamp), train=train_ref, heldout=held_ref)
        os.replace(tmp, path)  # a killed write never leaves a partial file under the real name
    return train_ref, held_ref


class WithReference:
    """A batch iterator whose batches carry ``ref_logps`` ``[B, 2]``, looked up by
    ``pair_index``; state and restore are the wrapped iterator's."""

    def __init__(self, inner, ref: np.ndarray):
        self.inner, self.ref = inner, ref

    def __iter__(self):
        return self

    def __next__(self):
        return attach(next(self.inner), self.ref)

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)

    @property
    def local_rows(self):
        return self.inner.local_rows

    @local_rows.setter
    def local_rows(self, rows):
        self.inner.local_rows = rows


def attach(batch, ref):
    batch = dict(batch)
    batch["ref_logps"] = ref[batch.pop("pair_index")].astype(np.float32)
    return batch


def without_index(batches):
    for b in batches:
        yield {k: v for k, v in b.items() if k != "pair_index"}


class Unindexed(WithReference):
    """Batches without ``pair_index`` (nothing to look up)."""

    def __init__(self, inner):
        super().__init__(inner, None)

    def __next__(self):
        batch = dict(next(self.inner))
        batch.pop("pair_index", None)
        return batch
