"""Supervised fine-tuning: a base model (a llmjax run or a Hugging Face directory), TRL-format
records, and either every parameter (or a subset) or LoRA adapters over a frozen, optionally
quantized, base.

A recipe module is configs, a loss and data: the loss is the pretraining next-token loss scored on
completion tokens only (the data's ``loss_mask``), the data ``llmjax.data.sft``; the base and the
adapters become a ``Task`` for the shared loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field

import jax

import llmjax
from llmjax.checkpoint.manager import absolute
from llmjax.config import ConfigError, ModelConfig
from llmjax.data.hf_tokenizer import keep_copy
from llmjax.data.sft import SFTData, SFTDataConfig, build_sft_data
from llmjax.errors import DataError
from llmjax.lora import LoraConfig, apply_lora, count_trainable, init_lora, lora_axes
from llmjax.losses import next_token_loss
from llmjax.train import LoopConfig, OptimizerConfig, Task, TrainResult, rundir, train
from llmjax.train.task import join, split_trainable, subtree

QUANTIZE_MODES = ("", "int8", "nf4")


@dataclass(frozen=True)
class SFTConfig:
    """One fine-tuning run. ``model`` is filled in from the base when the run starts."""

    base: str = ""  # a llmjax run directory or a Hugging Face model directory
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0)
    )
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=200, eval_every=50, save_every=50, sample_tokens=0)
    )
    lora: LoraConfig | None = None  # None: full fine-tuning
    quantize_base: str = ""  # LoRA only: store the frozen base as int8 or nf4 (QLoRA)
    # Weights QLoRA leaves in float (a regex over parameter paths): the output head, as
    # transformers' 8- and 4-bit loading does; no adapter can correct its rounding.
    quantize_keep: str = "lm_head"
    trainable: str = ""  # full fine-tuning only: a regex over parameter paths; empty: all
    # The base's layers: scanned (stacked, one lax.scan) or unrolled, which regexes that choose
    # some layers only (LoRA targets, trainable, quantize_keep) need.
    scan_layers: bool = True
    exact_match_prompts: int = 64  # held-out prompts decoded greedily at each eval; 0: none
    max_new_tokens: int = 64
    model: ModelConfig | None = None
    name: str = "sft"

    def __post_init__(self):
        check_tuning(self)


def check_tuning(cfg) -> None:
    """The checks every config that tunes a base shares (``lora``, ``quantize_base``,
    ``trainable``, ``data.batch_size`` against ``loop.grad_accum``): ``ConfigError`` if any fails."""
    if cfg.quantize_base not in QUANTIZE_MODES:
        raise ConfigError(
            f"quantize_base={cfg.quantize_base!r}: expected int8 or nf4 (or empty for none)"
        )
    if cfg.quantize_base and cfg.lora is None:
        raise ConfigError(
            "a quantized base trains only with LoRA adapters: give --lora-rank (QLoRA), or "
            "drop --quantize-base for full fine-tuning"
        )
    if cfg.data.batch_size % cfg.loop.grad_accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by "
            f"loop.grad_accum={cfg.loop.grad_accum}"
        )
    if cfg.trainable and cfg.lora is not None:
        raise ConfigError(
            "trainable selects parameters for full fine-tuning; with LoRA, choose the adapted "
            "weights with --lora-targets instead"
        )


@dataclass
class Base:
    """The model fine-tuning starts from, with its tokenizer and where it came from."""

    model: llmjax.Model
    params: dict
    tokenizer: object
    source: dict  # {"kind": "hf" | "run", "path": absolute path, "sha256": content hash}


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def load_base(path, scan_layers: bool | None = None) -> Base:
    """A base from a llmjax run (its newest usable checkpoint) or a Hugging Face directory.

    ``scan_layers`` stores its layers scanned or unrolled (``llmjax.models.scan``); None keeps
    the layout it loads in (a run's own, Hugging Face's: the config default). A fine-tuned run
    reads its base back in the layout it trained with.
    """
    base = _load_base(path)
    if scan_layers is None or scan_layers == base.model.config.scan_layers:
        return base
    from llmjax.models.scan import relayout

    model = type(base.model)(base.model.config.replace(scan_layers=scan_layers))
    return dataclasses.replace(
        base, model=model, params=relayout(model.config, base.params, scan_layers)
    )


def _load_base(path) -> Base:
    from llmjax.data.hf_tokenizer import open_tokenizer
    from llmjax.runs import load_run

    if not str(path):
        raise ConfigError("no base model: give --base RUN_OR_HF_DIR")
    p = absolute(path)
    if not p.exists():
        raise DataError(
            f"--base {path}: no such file or directory; give a llmjax run directory or a Hugging "
            "Face model directory (config.json, *.safetensors, tokenizer files)"
        )
    if (p / "config.json").is_file():
        model, params = llmjax.from_hf(p, param_dtype="float32")
        weights = [*p.glob("*.safetensors"), p / "config.json"]
        return Base(
            model,
            params,
            open_tokenizer(p),
            {"kind": "hf", "path": str(p), "sha256": _hash_files(weights)},
        )
    if p.is_dir() and "checkpoints" in (p.name, p.parent.name) or (p / "checkpoints").is_dir():
        run = load_run(p)  # a fine-tuned run gives its merged weights
        manifest = run.step_dir / "manifest.json"
        digest = (
            _hash_files([manifest])
            if manifest.is_file()
            else _hash_files([f for f in run.step_dir.rglob("*") if f.is_file()])
        )
        source = {"kind": "run", "path": str(run.step_dir), "sha256": digest}
        return Base(run.model, run.params, run.tokenizer, source)
    raise DataError(
        f"--base {path} is neither a llmjax run (no checkpoints/ inside) nor a Hugging Face model "
        "directory (no config.json); give the directory `llmjax pretrain --out` or "
        "`save_pretrained` wrote"
    )


def quantized_base(model, params, mode: str, keep: str = ""):
    """The frozen base as QLoRA holds it: linear weights quantized (``mode``), those matching
    ``keep`` as they were; ``params`` unchanged without a mode."""
    from llmjax.inference.quantize import quantize

    return quantize(model, params, mode, keep=keep) if mode else params


@dataclass
class Trainable:
    """What a fine-tuning run trains over a base: LoRA adapters over the frozen (optionally
    quantized) base, or the base's parameters (all, or those ``trainable`` selects)."""

    initial: object  # the trainable parameters at step 0, or a function of a PRNG key
    axes: dict
    frozen: dict
    frozen_axes: dict
    params_of: object  # (trainable, frozen, rng=None) -> parameters for model.apply
    count: int
    total: int
    identity: dict  # what a checkpoint must have trained to be resumed

    def log_count(self, log) -> None:
        n, total = self.count, self.total
        log(f"trainable parameters: {n:,} of {total:,} ({100 * n / total:.3f}%)")

    @property
    def start_metrics(self) -> dict:
        return {"trainable_params": self.count, "fraction_trainable": self.count / self.total}


def trainable(cfg, model, params) -> Trainable:
    """The ``Trainable`` of a config with the fields ``lora``, ``quantize_base``,
    ``quantize_keep`` and ``trainable`` (``SFTConfig`` and the preference recipes')."""
    identity = {
        "lora": dataclasses.asdict(cfg.lora) if cfg.lora else None,
        "quantize_base": cfg.quantize_base,
        "quantize_keep": cfg.quantize_keep if cfg.quantize_base else "",
        "pattern": cfg.trainable,
    }
    if cfg.lora is not None:
        frozen = {"base": quantized_base(model, params, cfg.quantize_base, cfg.quantize_keep)}
        # Quantized blocks do not have the weights' shapes: they stay whole on every device.
        frozen_axes = {"base": None if cfg.quantize_base else model.param_axes()}

        def params_of(adapters, frozen, rng=None):  # rng: LoRA dropout, training only
            return apply_lora(frozen["base"], adapters, cfg.lora, key=rng)

        initial = lambda key: init_lora(model, cfg.lora, key)  # noqa: E731
        count = count_trainable(model, jax.eval_shape(initial, jax.random.PRNGKey(0)))
        return Trainable(
            initial,
            lora_axes(model, cfg.lora),
            frozen,
            frozen_axes,
            params_of,
            count.trainable,
            count.total,
            identity,
        )
    initial, rest = (
        split_trainable(params, cfg.trainable, model.config) if cfg.trainable else (params, {})
    )

    def params_of(params, frozen, rng=None):
        return join(params, frozen["rest"])

    return Trainable(
        initial,
        subtree(model.param_axes(), initial),
        {"rest": rest},
        {"rest": subtree(model.param_axes(), rest)},
        params_of,
        sum(math.prod(x.shape) for x in jax.tree.leaves(initial)),
        model.num_params(),
        identity,
    )


def task(cfg: SFTConfig, base: Base, data: SFTData, log=print) -> Task:
    """The fine-tuning ``Task``: what trains, what stays frozen, the loss and the evaluation."""
    model = base.model
    scored = next_token_loss(model, accuracy=True, chunk=cfg.loop.ce_chunk)
    t = trainable(cfg, model, base.params)
    identity = {
        "tokenizer_sha256": data.tokenizer.sha256,
        "data_fingerprint": data.fingerprint,
        "base": base.source["sha256"],
        "trainable": t.identity,
    }

    def loss(params, frozen, batch, rng):
        return scored(t.params_of(params, frozen, rng), {}, batch, rng)

    t.log_count(log)
    return Task(
        params=t.initial,
        axes=t.axes,
        loss=loss,
        train=data.train,
        heldout=data.heldout.batches,
        model=model.config,
        frozen=t.frozen,
        frozen_axes=t.frozen_axes,
        evaluate=_exact_match_eval(cfg, model, data, t.params_of),
        identity=identity,
        start_metrics=t.start_metrics,
    )


def exact_match(model, params, tokenizer, examples, max_new_tokens: int, batch_size: int = 32):
    """The fraction of ``(prompt_ids, completion_ids)`` whose greedy continuation decodes to the
    completion's text (surrounding whitespace ignored; generation stops at a stop id)."""
    from llmjax.inference import generate

    stops = tuple(tokenizer.stop_ids)
    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out = generate(
            model,
            params,
            [p for p, _ in chunk],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            stop_tokens=stops,
        ).tokens
        for got, (_, want) in zip(out, chunk, strict=True):
            want = [t for t in want if t not in stops]
            hits += tokenizer.decode(got).strip() == tokenizer.decode(want).strip()
    return hits / max(len(examples), 1)


def _exact_match_eval(cfg: SFTConfig, model, data: SFTData, params_of):
    examples = data.heldout.examples[: cfg.exact_match_prompts]
    if not examples:
        return None
    merged = jax.jit(params_of)

    def evaluate(params, frozen) -> dict:
        full = merged(params, frozen)
        em = exact_match(model, full, data.tokenizer, examples, cfg.max_new_tokens)
        return {"eval_exact_match": em}

    return evaluate


def prepare(cfg: SFTConfig, out_dir, log=print):
    """The base, the data and the completed config of a run (its ``model`` from the base)."""
    base = load_base(cfg.base, cfg.scan_layers)
    cfg = dataclasses.replace(cfg, model=base.model.config, base=base.source["path"])
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is beyond the base model's max_seq_len="
            f"{cfg.model.max_seq_len}; lower --seq-len"
        )
    data = build_sft_data(cfg.data, base.tokenizer, cfg.model.vocab_size)
    # The run keeps its own copy of the tokenizer: the base may move or change.
    keep_copy(data.tokenizer, out_dir, "sft")
    log(f"base: {base.source['kind']} {base.source['path']} ({base.model})")
    log(f"data: {data.description}")
    return cfg, base, data


def run(cfg: SFTConfig, out_dir, log=print) -> TrainResult:
    """Fine-tune (or resume) in ``out_dir``; the final evaluation is in ``result.eval_metrics``."""
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    with rundir.hold(out_dir):
        cfg, base, data = prepare(cfg, out_dir, log)
        result = train(cfg, task(cfg, base, data, log), out_dir, log=log)
    for k, v in result.eval_metrics.items():
        log(f"{k} {v:.4f}")
    return result
