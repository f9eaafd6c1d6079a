"""Load a trained run for evaluation, sampling or export: model, parameters and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax

from llmjax.checkpoint.manager import read_meta, resolve_checkpoint, restore


@dataclass
class LoadedRun:
    model: object  # llmjax.Model
    params: dict
    meta: dict  # the checkpoint's JSON item: step, data position, full config, tokenizer hash
    tokenizer: object  # llmjax.data.Tokenizer
    step_dir: Path


def load_run(path: str | Path) -> LoadedRun:
    """The newest complete checkpoint under ``path`` (a run, checkpoints or step directory).

    Everything needed is in the checkpoint: the model is rebuilt from the saved config, and the
    tokenizer is found by the hash recorded at training time (its configured path, else the
    run's ``tokenizer/`` directory), so a mismatched tokenizer can never be paired with it.
    """
    import llmjax
    from llmjax.data import DataError, Tokenizer
    from llmjax.train.config import model_config_from_dict

    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    cfg = meta["config"]
    model = llmjax.build(model_config_from_dict(cfg["model"]))
    # Only the parameters are read; the optimizer state beside them stays on disk.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), model.abstract_params()
    )
    state, _ = restore(step_dir, {"params": abstract}, partial=True)
    run_dir = step_dir.parent.parent
    candidates = [Path(cfg["data"]["tokenizer"])] if cfg["data"]["tokenizer"] else []
    candidates += sorted((run_dir / "tokenizer").glob("*.model"))
    for cand in candidates:
        if cand.is_file():
            tok = Tokenizer.load(cand)
            if tok.sha256 == meta["tokenizer_sha256"]:
                return LoadedRun(model, state["params"], meta, tok, step_dir)
    raise DataError(
        f"the tokenizer of {step_dir} (sha256 {meta['tokenizer_sha256'][:12]}) is not in "
        f"{run_dir / 'tokenizer'} nor at its configured path"
    )
