"""Load a trained run for evaluation, sampling or export: model, parameters and tokenizer.

A pretraining run's checkpoint holds every parameter. A fine-tuning run's holds only what trained
(adapters, or the trained subset) plus the base's location and hash: the base is read again,
checked against that hash, and combined, so ``llmjax.load(RUN)`` is a ready model either way.
"""

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
    params: dict  # every parameter, ready for model.apply (adapters merged in)
    meta: dict  # the checkpoint's JSON item: step, data position, full config, identity
    tokenizer: object  # llmjax.data.Tokenizer or HFTokenizer
    step_dir: Path
    adapters: dict | None = None  # a LoRA run's adapters, as trained
    lora: object = None  # its LoraConfig
    base_params: dict | None = None  # a LoRA run's base as trained (dequantized for QLoRA)
    head: dict | None = None  # a reward model's scalar head ({"score": [D]}); None otherwise


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


def _on_device(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def _load_step(step_dir: Path) -> LoadedRun:
    import llmjax
    from llmjax.config import model_config_from_dict

    meta = read_meta(step_dir)
    cfg = meta["config"]
    model = llmjax.build(model_config_from_dict(cfg["model"]))
    tok = _run_tokenizer(step_dir, meta)
    if "base" not in meta.get("identity", {}):
        # Only the parameters are read; the optimizer state beside them stays on disk.
        state, meta = restore(
            step_dir, {"params": _on_device(model.abstract_params())}, partial=True
        )
        return LoadedRun(model, state["params"], meta, tok, step_dir)
    return _load_finetuned(step_dir, meta, model, tok)


def _load_finetuned(step_dir: Path, meta: dict, model, tok) -> LoadedRun:
    from llmjax.config import dtype_of
    from llmjax.data import DataError
    from llmjax.inference.quantize import dequantize
    from llmjax.lora import LoraConfig, init_lora, merge
    from llmjax.recipes.sft import load_base, quantized_base
    from llmjax.train.task import join, split_trainable

    cfg = meta["config"]
    base = load_base(cfg["base"], scan_layers=model.config.scan_layers)
    if base.source["sha256"] != meta["identity"]["base"]:
        raise DataError(
            f"the base model at {cfg['base']} changed since {step_dir} was trained from it "
            "(its files' hash differs); put the original base back at that path"
        )
    # A reward model's checkpoint holds {"decoder": what trained of the base, "head": ...}; a
    # PPO run's {"policy": what trained, "critic": ...}, of which only the policy is read.
    scored = meta["identity"].get("head") == "score"
    with_critic = "critic" in meta["identity"]

    def read(decoder_abstract):
        tree = decoder_abstract
        if scored:
            D = model.config.d_model
            head = {"score": jax.ShapeDtypeStruct((D,), dtype_of(model.config.param_dtype))}
            tree = {"decoder": decoder_abstract, "head": head}
        elif with_critic:
            tree = {"policy": decoder_abstract}
        state, meta_ = restore(step_dir, {"params": _on_device(tree)}, partial=True)
        params = state["params"]
        if scored:
            return (params["decoder"], params["head"]), meta_
        return (params["policy"] if with_critic else params, None), meta_

    if cfg.get("lora"):
        lora = LoraConfig(**cfg["lora"])
        abstract = jax.eval_shape(lambda: init_lora(model, lora, jax.random.PRNGKey(0)))
        (adapters, head), meta = read(abstract)
        frozen = base.params
        if cfg.get("quantize_base"):  # the forward it trained with saw the quantized base
            # Runs from before quantize_keep existed quantized every linear weight.
            keep = cfg.get("quantize_keep", "")
            frozen = dequantize(quantized_base(model, base.params, cfg["quantize_base"], keep))
        params = jax.jit(merge, static_argnums=2)(frozen, adapters, lora)
        return LoadedRun(model, params, meta, tok, step_dir, adapters, lora, frozen, head)
    trained, rest = (
        split_trainable(base.params, cfg["trainable"], model.config)
        if cfg.get("trainable")
        else (base.params, {})
    )
    (decoder, head), meta = read(_shapes(trained))
    return LoadedRun(model, join(decoder, rest), meta, tok, step_dir, head=head)


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _run_tokenizer(step_dir: Path, meta: dict):
    """The tokenizer with the hash the run recorded: in its ``tokenizer/``, or where configured."""
    from llmjax.data import DataError
    from llmjax.data.hf_tokenizer import open_tokenizer

    run_dir = step_dir.parent.parent
    want = meta.get("identity", {}).get("tokenizer_sha256") or meta["tokenizer_sha256"]
    configured = meta["config"].get("data", {}).get("tokenizer")
    candidates = sorted((run_dir / "tokenizer").glob("*"))
    candidates += [Path(configured)] if configured else []
    for cand in candidates:
        if cand.exists() and not cand.name.startswith("."):
            try:
                tok = open_tokenizer(cand)
            except DataError:
                continue
            if tok.sha256 == want:
                return tok
    raise DataError(
        f"the tokenizer of {step_dir} (sha256 {want[:12]}) is neither in "
        f"{run_dir / 'tokenizer'} nor at its configured path; copy the tokenizer the run was "
        "trained with into that directory"
    )


def load(path, notify=None):
    """``(model, params)`` ready for ``model.apply`` from any run: pretrained, fully fine-tuned or
    LoRA (adapters applied), the newest usable checkpoint of ``path``."""
    run = load_run(path, notify)
    return run.model, run.params


def load_tokenizer(path):
    """The tokenizer of a run (the one it trained with), a Hugging Face directory, a
    ``tokenizer.json`` or a SentencePiece ``.model`` file."""
    from llmjax.data.hf_tokenizer import open_tokenizer

    p = Path(path)
    if p.is_dir() and ((p / "checkpoints").is_dir() or p.parent.name == "checkpoints"):
        step = checkpoint_candidates(p)[0]
        return _run_tokenizer(step, read_meta(step))
    return open_tokenizer(p)
