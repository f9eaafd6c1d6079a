"""Load a trained run for evaluation, sampling or export: model, parameters and tokenizer."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jax

from llmjax.checkpoint import (
    CheckpointDamaged,
    CheckpointError,
    checkpoint_candidates,
    read_meta,
    restore,
)
from llmjax.errors import one_line


@dataclass
class LoadedRun:
    model: object  # llmjax.Model
    params: dict
    meta: dict  # the checkpoint's JSON item: step, data position, full config, tokenizer hash
    tokenizer: object  # llmjax.data.Tokenizer
    step_dir: Path


def load_run(path: str | Path, notify=None) -> LoadedRun:
    """The newest usable checkpoint under ``path`` (a run, checkpoints or step directory).

    Everything needed is in the checkpoint: the model is rebuilt from the saved config, and the
    tokenizer is found by the hash recorded at training time (the run's ``tokenizer/``
    directory, else its configured path), so a mismatched tokenizer can never be paired with it.
    A damaged newest step is reported in one line through ``notify`` (default: the ``llmjax``
    logger) and the previous one is used; nothing is moved, since reading must not change a
    run that may still be training. An explicit step directory never falls back.
    """
    notify = notify or logging.getLogger("llmjax").warning
    candidates = checkpoint_candidates(path)
    damaged = []
    for step_dir in candidates:
        try:
            run = _load_step(step_dir)
        except CheckpointDamaged as e:
            damaged.append(e)
            continue
        for e in damaged:
            notify(f"{one_line(e)}; using step {step_dir.name}")
        return run
    raise CheckpointError(
        f"{path}: no usable checkpoint ({'; '.join(one_line(e) for e in damaged)})"
    )


def _load_step(step_dir: Path) -> LoadedRun:
    import llmjax
    from llmjax.config import model_config_from_dict
    from llmjax.data import DataError, Tokenizer

    meta = read_meta(step_dir)
    cfg = meta["config"]
    model = llmjax.build(model_config_from_dict(cfg["model"]))
    # Only the parameters are read; the optimizer state beside them stays on disk.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), model.abstract_params()
    )
    state, meta = restore(step_dir, {"params": abstract}, partial=True)
    run_dir = step_dir.parent.parent
    candidates = sorted((run_dir / "tokenizer").glob("*.model"))
    candidates += [Path(cfg["data"]["tokenizer"])] if cfg["data"]["tokenizer"] else []
    for cand in candidates:
        if cand.is_file():
            tok = Tokenizer.load(cand)
            if tok.sha256 == meta["tokenizer_sha256"]:
                return LoadedRun(model, state["params"], meta, tok, step_dir)
    raise DataError(
        f"the tokenizer of {step_dir} (sha256 {meta['tokenizer_sha256'][:12]}) is neither in "
        f"{run_dir / 'tokenizer'} nor at its configured path; copy the tokenizer the run was "
        "trained with into that directory"
    )
