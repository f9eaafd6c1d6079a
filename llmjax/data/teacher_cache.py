"""Offline distillation: the teacher's top-k logits for every training batch, computed once.

With ``--teacher-cache DIR`` a run first passes the teacher over exactly the batches training will
read (the data iterator from its start, one batch per step) and writes, for each step, the ids and
raw logits of the teacher's ``k`` most likely tokens at every position. Training then reads them
beside each batch instead of holding the teacher in memory. Raw logits, not probabilities, are
kept, so the temperature stays a training setting: softmax over the top-k logits / T is exactly
the renormalised top-k of softmax(logits / T).

Layout: ``ids.npy`` (int32) and ``logits.npy`` (float32), each ``[steps, B, T, k]``, for the
rest bucket ``logz.npy`` (the teacher's log-normaliser at the run's temperature, ``[steps, B,
T]``), and ``cache.json`` with what the cache was computed from (the teacher's hash, the data's fingerprint,
k, batch shape) and how many steps are written. ``cache.json`` is replaced atomically after each
flushed chunk, so a killed writer resumes where it stopped and a reader never trusts a step that
was not flushed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmjax.errors import DataError

META = "cache.json"
CHUNK = 32  # steps between flushes: a killed writer loses at most this much work


def arrays(key: dict) -> list[tuple[str, type, int]]:
    """``(name, dtype, trailing dims dropped)`` of the arrays a cache with ``key`` holds: the
    top-k ids and logits ``[S, B, T, k]``, and for the rest bucket the teacher's log-normaliser
    at the run's temperature ``[S, B, T]``."""
    out = [("ids", np.int32, 0), ("logits", np.float32, 0)]
    return out + [("logz", np.float32, 1)] if key.get("top_k_rest") == "bucket" else out


def _open(directory: Path, key: dict, shape, mode: str, suffix: str = ""):
    return [
        np.lib.format.open_memmap(
            directory / f"{name}.npy{suffix}", mode, dtype, shape[: len(shape) - drop]
        )
        for name, dtype, drop in arrays(key)
    ]


def _write_meta(directory: Path, meta: dict) -> None:
    tmp = directory / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, directory / META)


def read_meta(directory) -> dict | None:
    path = Path(directory) / META
    return json.loads(path.read_text()) if path.is_file() else None


def build(
    directory,
    key: dict,
    steps: int,
    batches,
    top_k_fn: Callable[[dict], tuple[np.ndarray, np.ndarray]],
    log=print,
) -> None:
    """Write the teacher's top-k for ``steps`` batches of ``batches`` into ``directory``.

    ``key`` says what the cache is computed from; a directory holding a cache of another key is
    refused rather than overwritten. ``batches`` must start where training starts; a partial
    cache of the same key is continued (the batches it already holds are skipped, not recomputed).
    """
    d = Path(directory)
    meta = read_meta(d)
    if meta is not None and meta["key"] != key:
        diff = sorted(k for k in set(key) | set(meta["key"]) if key.get(k) != meta["key"].get(k))
        raise DataError(
            f"--teacher-cache {directory} holds the top-k of another setup (differs in "
            f"{', '.join(diff)}); give another directory or delete this one"
        )
    if meta is not None and meta["written"] >= steps:
        return
    d.mkdir(parents=True, exist_ok=True)
    B, T, K = key["batch_size"], key["seq_len"], key["top_k"]
    shape = (steps, B, T, K)
    done = 0 if meta is None else meta["written"]
    if meta is not None and tuple(meta["shape"]) == shape:
        files = _open(d, key, shape, "r+")
    else:
        files = _open(d, key, shape, "w+", suffix=".tmp")
        if done:  # written for fewer steps before: keep what it holds
            for new, old in zip(files, _open(d, key, tuple(meta["shape"]), "r"), strict=True):
                new[:done] = old[:done]
                new.flush()
        # The old files stay whole until the new ones hold everything they did.
        for name, _, _ in arrays(key):
            os.replace(d / f"{name}.npy.tmp", d / f"{name}.npy")
        if done:
            _write_meta(d, {"key": key, "shape": list(shape), "written": done})
    if done:
        log(f"teacher cache: continuing {directory} at step {done} of {steps}")
    else:
        log(f"teacher cache: writing the teacher's top-{K} for {steps} steps to {directory}")
    for i in range(steps):
        batch = next(batches)
        if i < done:
            continue
        for f, value in zip(files, top_k_fn(batch), strict=True):
            f[i] = value
        if (i + 1) % CHUNK == 0 or i + 1 == steps:
            for f in files:
                f.flush()
            _write_meta(d, {"key": key, "shape": list(shape), "written": i + 1})
    del files


class CachedTeacher:
    """A batch iterator that adds the cached ``teacher_ids``, ``teacher_logits`` (and
    ``teacher_logz``) to each batch of ``inner``, which must yield the batches the cache was built
    from, in order."""

    def __init__(self, inner, directory, key: dict, steps: int):
        meta = read_meta(directory)
        if meta is None or meta["key"] != key or meta["written"] < steps:
            raise DataError(
                f"--teacher-cache {directory} does not hold the top-k of this run's {steps} steps; "
                "run the same command again to (re)write it"
            )
        self.inner = inner
        names = [name for name, _, _ in arrays(key)]
        files = _open(Path(directory), key, tuple(meta["shape"]), "r")
        self.files = dict(zip(names, files, strict=True))
        self.step = 0

    @property
    def local_rows(self):
        return self.inner.local_rows

    @local_rows.setter
    def local_rows(self, rows):
        self.inner.local_rows = rows

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step >= len(self.files["ids"]):
            raise DataError(
                f"the teacher cache holds {len(self.files['ids'])} steps and the run asked for "
                "more; raise the steps the cache is written for by running the command with --steps"
            )
        batch = next(self.inner)
        rows = self.inner.local_rows
        for name, f in self.files.items():
            batch[f"teacher_{name}"] = np.asarray(f[self.step][rows])
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"inner": self.inner.state(), "cache_step": self.step}

    def restore(self, state: dict) -> None:
        self.inner.restore(state["inner"])
        self.step = int(state["cache_step"])
