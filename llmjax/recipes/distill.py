"""Knowledge distillation: a student learns a frozen teacher's next-token distributions.

A recipe module is configs, a loss and data. The loss is ``llmjax.losses.distill_loss`` (forward
KL, reverse KL or generalized JSD between temperature-softened distributions, or forward KL
against the teacher's top-k), mixed with the hard-label cross entropy by ``alpha``; the data is a
text corpus (the pretraining pipeline) or TRL-format jsonl records (the SFT pipeline), tokenized
with the teacher's tokenizer. The teacher is a frozen tree of the ``Task``: sharded, never in the
optimizer state, never saved.

Where the continuations come from, per step:

- the data (the default);
- the student itself with probability ``on_policy_fraction`` (GKD, Agarwal et al. 2024): it
  samples a continuation of each prompt inside the jitted step (``llmjax.inference.rollout``)
  and the teacher scores it; the hard-label term is dropped on those steps, its targets being the
  student's own samples;
- the teacher otherwise, with ``seq_kd`` (sequence-level KD, Kim & Rush 2016).

A prompt is the part of a record before its completion, or the first ``prompt_len`` tokens of a
text row. Offline (``teacher_cache``): the teacher's top-k logits for every step are written once
(``llmjax.data.teacher_cache``) and training reads them without the teacher in memory.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax.checkpoint.manager import absolute
from llmjax.config import ConfigError, ModelConfig
from llmjax.data import DataConfig, build_data, eval_batches, teacher_cache
from llmjax.data.hf_tokenizer import keep_copy
from llmjax.data.sft import SFTDataConfig, build_sft_data
from llmjax.errors import DataError
from llmjax.losses import (
    TOP_K_RESTS,
    distill_loss,
    distill_loss_top_k,
    masked_cross_entropy,
    next_token_loss,
    real_tokens,
    teacher_log_normalizer,
    teacher_top_k,
)
from llmjax.losses.core import add_router_loss, apply_routed
from llmjax.train import LoopConfig, OptimizerConfig, Task, TrainResult, rundir, train

KINDS = ("forward_kl", "reverse_kl", "jsd")
# Fields recorded elsewhere in a run's identity, or that do not change what it learns.
_NOT_SETTINGS = ("teacher", "student", "data", "optim", "loop", "teacher_cache", "model", "name")
QUANTIZE_MODES = ("", "int8", "nf4")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. ``model`` is the student's (a preset's, with ``--set model.*``
    overrides, or filled in from ``student`` when that is a run or Hugging Face directory)."""

    teacher: str = ""  # a llmjax run or Hugging Face directory
    student: str = ""  # a preset name, a llmjax run or a Hugging Face directory
    data: DataConfig | SFTDataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine")
    )
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=300, sample_tokens=0))
    kind: str = "forward_kl"
    beta: float = 0.5  # jsd: the teacher's weight in the mixture
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the hard-label cross entropy; 1 - alpha goes to the divergence
    top_k: int = 0  # > 0: forward KL against the teacher's top-k only
    # What top-k does with the teacher's other ids: "bucket" keeps their mass as one outcome,
    # "renormalize" spreads it over the k (sharper than the teacher; see benchmarks.md).
    top_k_rest: str = "bucket"
    on_policy_fraction: float = 0.0  # GKD's lambda: steps whose continuations the student samples
    seq_kd: bool = False  # other steps train on the teacher's sampled continuations
    sample_temperature: float = 1.0  # of on-policy and sequence-level continuations
    prompt_len: int = 0  # text rows: tokens kept as the prompt; 0: half of data.seq_len
    max_new_tokens: int = 0  # records: tokens sampled per prompt; 0: half of data.seq_len
    teacher_cache: str = ""  # a directory: train from the teacher's cached top-k logits
    quantize_teacher: str = ""  # store the frozen teacher as int8 or nf4
    model: ModelConfig | None = None
    name: str = "distill"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"kind={self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"beta={self.beta}: the jsd mixture weight must lie in (0, 1)")
        checks = [
            (self.temperature > 0, f"temperature={self.temperature}: must be positive"),
            (0 <= self.alpha <= 1, f"alpha={self.alpha}: the hard-label weight lies in [0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k}: must be >= 0 (0: the full vocabulary)"),
            (
                self.top_k_rest in TOP_K_RESTS,
                f"top_k_rest={self.top_k_rest!r}: expected one of {', '.join(TOP_K_RESTS)}",
            ),
            (
                0 <= self.on_policy_fraction <= 1,
                f"on_policy_fraction={self.on_policy_fraction}: a probability in [0, 1]",
            ),
            (self.sample_temperature > 0, "sample_temperature must be positive"),
            (self.prompt_len >= 0 and self.max_new_tokens >= 0, "lengths must be >= 0"),
            (
                self.quantize_teacher in QUANTIZE_MODES,
                f"quantize_teacher={self.quantize_teacher!r}: expected int8 or nf4 (or empty)",
            ),
            (
                not (self.top_k and self.kind != "forward_kl"),
                f"--top-k is forward KL against the teacher's top-k; drop --kind {self.kind} or "
                "--top-k",
            ),
            (
                not self.teacher_cache or self.top_k,
                "--teacher-cache stores the teacher's top-k logits: give --top-k K",
            ),
            (
                not (self.teacher_cache and (self.on_policy_fraction or self.seq_kd)),
                "--teacher-cache cannot score new continuations (on-policy, --seq-kd): the "
                "teacher is not loaded; drop one of them",
            ),
            (
                not (self.records and self.sampled and self.data.packing),
                "on-policy and --seq-kd continue one prompt per row: set data.packing=false",
            ),
            (
                self.data.batch_size % self.loop.grad_accum == 0,
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"loop.grad_accum={self.loop.grad_accum}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.sampled:
            self.lengths()

    @property
    def records(self) -> bool:
        return isinstance(self.data, SFTDataConfig)

    @property
    def sampled(self) -> bool:
        return bool(self.on_policy_fraction or self.seq_kd)

    def lengths(self) -> tuple[int, int]:
        """``(prompt width L, new tokens N)`` of sampled continuations, ``L + N = seq_len + 1``."""
        T = self.data.seq_len
        records = self.max_new_tokens or T // 2
        N = records if self.records else T + 1 - (self.prompt_len or T // 2)
        if not 1 <= N <= T:
            raise ConfigError(
                f"sampled continuations of {N} tokens do not fit rows of data.seq_len={T}; "
                "set prompt_len (text) or max_new_tokens (records) between 1 and seq_len"
            )
        return T + 1 - N, N


def load_tokenizers(cfg: DistillConfig):
    """The teacher's tokenizer; the student's must be the same (checked before any weights load)."""
    teacher_tok = llmjax.load_tokenizer(absolute(cfg.teacher))
    student = Path(cfg.student) if cfg.student else None
    if student is not None and student.exists():
        student_tok = llmjax.load_tokenizer(absolute(student))
        if student_tok.sha256 != teacher_tok.sha256:
            raise DataError(
                f"the teacher ({cfg.teacher}) and the student ({cfg.student}) have different "
                f"tokenizers (sha256 {teacher_tok.sha256[:12]} vs {student_tok.sha256[:12]}); "
                "distillation compares distributions over one vocabulary: start the student from "
                "a preset (it takes the teacher's tokenizer) or from a model with the same one"
            )
    return teacher_tok


def _check_paths(cfg: DistillConfig) -> None:
    for flag, value in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        if not value:
            raise ConfigError(f"no {flag[2:]} model: give {flag}")
    if not Path(cfg.teacher).exists():
        raise DataError(
            f"--teacher {cfg.teacher}: no such file or directory; give a llmjax run directory or "
            "a Hugging Face model directory"
        )


def student_start(cfg: DistillConfig, teacher):
    """``(model config, initial params or init function, source)`` of the student."""
    from llmjax.recipes.sft import load_base

    if Path(cfg.student).exists():
        base = load_base(cfg.student)
        if base.model.config.vocab_size != teacher.model.config.vocab_size:
            raise DataError(
                f"the student's vocab_size {base.model.config.vocab_size} differs from the "
                f"teacher's {teacher.model.config.vocab_size}: their logits cannot be compared"
            )
        return base.model.config, base.params, base.source
    model = cfg.model or llmjax.presets.get(cfg.student)
    return model.replace(vocab_size=teacher.model.config.vocab_size), None, {"preset": cfg.student}


def build_data_for(cfg: DistillConfig, tokenizer, vocab_size: int, out_dir):
    """Batches in the teacher's tokenization: ``(train iterator, heldout(B, n), fingerprint)``."""
    if cfg.records:
        data = build_sft_data(cfg.data, tokenizer, vocab_size)
        return data.train, data.heldout.batches, data.fingerprint, data.description
    data = build_data(cfg.data, out_dir, vocab_size, tokenizer=tokenizer)
    heldout = lambda batch_size, n: eval_batches(data.heldout, batch_size, n)  # noqa: E731
    return data.train, heldout, data.fingerprint, data.description


def _continuations(cfg: DistillConfig, student, teacher, stop_ids):
    """``pick(params, frozen, batch, rng) -> (batch, on_policy, lengths)``: each step's batch
    with its continuations from the data, the student (with probability ``on_policy_fraction``)
    or, with ``seq_kd``, the teacher. Runs inside the jitted step."""
    from llmjax.inference import SamplingConfig, continuation_batch, rollout

    L, N = cfg.lengths()
    sampling = SamplingConfig(temperature=cfg.sample_temperature)
    T = cfg.data.seq_len

    def sample(model, params, batch, key):
        mask = batch["loss_mask"] > 0
        if cfg.records:  # the prompt: every token before the first scored target
            lengths = jnp.argmax(mask, axis=1).astype(jnp.int32) + 1
            usable = mask.any(axis=1) & (lengths <= L)
        else:
            lengths = jnp.full(mask.shape[:1], L, jnp.int32)
            usable = jnp.ones(mask.shape[:1], bool)
        lengths = jnp.minimum(lengths, L)
        prompt = batch["tokens"][:, :L]
        r = rollout(
            model,
            jax.lax.stop_gradient(params),
            prompt,
            lengths,
            key,
            max_new=N,
            sampling=sampling,
            stop_ids=stop_ids,
            masked=cfg.records,
        )
        new = continuation_batch(prompt, lengths, r, T)
        # Records whose prompt leaves no room keep the data's completion.
        out = {k: jnp.where(usable[:, None], new[k], batch[k]) for k in new}
        out["loss_mask"] = out["loss_mask"].astype(batch["loss_mask"].dtype)
        n = r.completion_mask_BN.sum(axis=1).astype(jnp.float32)
        return {**batch, **out}, jnp.where(usable, n, 0.0).sum() / jnp.maximum(usable.sum(), 1)

    def pick(params, frozen, batch, rng):
        choose, key = jax.random.split(rng)
        on = jax.random.bernoulli(choose, cfg.on_policy_fraction)
        branches = [
            lambda b: (b, jnp.float32(0)),  # the data's continuation
            lambda b: sample(student, params, b, key),
        ]
        if cfg.seq_kd:
            branches[0] = lambda b: sample(teacher, frozen["teacher"], b, key)
        batch, length = jax.lax.cond(on, branches[1], branches[0], batch)
        return batch, on.astype(jnp.float32), length

    return pick


def make_loss(cfg: DistillConfig, student, teacher, stop_ids):
    """``loss(params, frozen, batch, rng)``: ``(1 - a) * divergence + a * hard-label CE`` with
    ``a = alpha`` (0 on on-policy steps), and the ``distill/*`` metrics; a mixture-of-experts
    student adds its router losses (``llmjax.losses.core.router_loss``)."""
    pick = _continuations(cfg, student, teacher, stop_ids) if cfg.sampled else None

    def loss(params, frozen, batch, rng):
        on = length = None
        if pick is not None:
            batch, on, length = pick(params, frozen, batch, rng)
        mask = batch["loss_mask"]
        inputs = {k: batch[k] for k in ("positions", "segment_ids")}
        logits, moe_aux = apply_routed(student, params, batch["tokens"], **inputs)
        hard, hard_aux = masked_cross_entropy(logits, batch["targets"], mask)
        aux = {"distill/hard_loss": hard}
        if cfg.teacher_cache:
            div, m = distill_loss_top_k(
                logits,
                batch["teacher_ids"],
                batch["teacher_logits"],
                mask,
                temperature=cfg.temperature,
                teacher_logz_BT=batch.get("teacher_logz"),
            )
        else:
            t_logits = teacher.apply(
                jax.lax.stop_gradient(frozen["teacher"]), batch["tokens"], **inputs
            )
            div, m = distill_loss(
                logits,
                t_logits,
                mask,
                kind=cfg.kind,
                beta=cfg.beta,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_k_rest=cfg.top_k_rest,
            )
            aux["distill/teacher_nll"] = masked_cross_entropy(t_logits, batch["targets"], mask)[0]
        a = cfg.alpha if on is None else cfg.alpha * (1.0 - on)
        total = a * hard + (1.0 - a) * div
        aux.update({"distill/kl": m["kl"], "tokens": hard_aux["tokens"]})
        total, aux = add_router_loss(student.config, moe_aux, total, aux)
        aux["num_tokens"] = real_tokens(batch)
        if on is not None:
            aux["completions/mean_length"] = length
            aux["on_policy"] = on
        return total, aux

    return loss


def _teacher_forward(teacher, params, cfg: DistillConfig):
    bucket = cfg.top_k_rest == "bucket"

    @jax.jit
    def top(params, batch):
        logits = teacher.apply(
            params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        out = teacher_top_k(logits, cfg.top_k)
        return (*out, teacher_log_normalizer(logits, cfg.temperature)) if bucket else out

    return lambda batch: tuple(np.asarray(a) for a in top(params, batch))


def task(cfg: DistillConfig, out_dir, log=print) -> Task:
    """Load the teacher, the student's start and the data, write the teacher cache if asked,
    and assemble the ``Task``."""
    from llmjax.inference.quantize import QuantizedModel, quantize
    from llmjax.recipes.sft import load_base

    tokenizer = load_tokenizers(cfg)
    teacher = load_base(cfg.teacher)
    student_cfg, student_params, student_source = student_start(cfg, teacher)
    student = llmjax.build(student_cfg)
    if cfg.data.seq_len > min(student_cfg.max_seq_len, teacher.model.config.max_seq_len):
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is beyond the max_seq_len of the student "
            f"({student_cfg.max_seq_len}) or the teacher ({teacher.model.config.max_seq_len})"
        )
    train_it, heldout, fingerprint, description = build_data_for(
        cfg, tokenizer, student_cfg.vocab_size, out_dir
    )
    keep_copy(tokenizer, out_dir, "distill")
    log(f"teacher: {teacher.source['kind']} {teacher.source['path']} ({teacher.model})")
    log(f"student: {cfg.student} ({student})")
    log(f"data: {description}")
    settings = {
        f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NOT_SETTINGS
    }
    identity = {
        "tokenizer_sha256": tokenizer.sha256,
        "data_fingerprint": fingerprint,
        "teacher": teacher.source["sha256"],
        "student_start": student_source.get("sha256", student_source.get("preset")),
        "distill": settings,
    }
    q = cfg.quantize_teacher
    teacher_model = QuantizedModel(teacher.model) if q else teacher.model
    # The output head stays float, as for QLoRA's base: its rounding reaches every logit.
    teacher_params = (
        quantize(teacher.model, teacher.params, q, keep="lm_head") if q else teacher.params
    )
    teacher = dataclasses.replace(teacher, params=None)
    frozen, frozen_axes = {}, {}
    if cfg.teacher_cache:
        key = {
            "teacher": teacher.source["sha256"],
            "data_fingerprint": fingerprint,
            "top_k": cfg.top_k,
            "batch_size": cfg.data.batch_size,
            "seq_len": cfg.data.seq_len,
            "quantize_teacher": q,
            "top_k_rest": cfg.top_k_rest,
        }
        if cfg.top_k_rest == "bucket":  # its log-normalisers are the temperature's
            key["temperature"] = cfg.temperature
        cache_dir = absolute(cfg.teacher_cache)
        meta = teacher_cache.read_meta(cache_dir)
        complete = meta is not None and meta["key"] == key and meta["written"] >= cfg.loop.steps
        if not complete and jax.process_count() > 1:
            raise ConfigError(
                "--teacher-cache is written by one process: write it with a single-host run of "
                "the same command first (the job then reads it on every host), or distil online"
            )
        start = train_it.state()
        forward = _teacher_forward(teacher_model, teacher_params, cfg)
        teacher_cache.build(cache_dir, key, cfg.loop.steps, train_it, forward, log)
        train_it.restore(start)
        train_it = teacher_cache.CachedTeacher(train_it, cache_dir, key, cfg.loop.steps)
        del forward, teacher_params  # training runs without the teacher
    else:
        frozen["teacher"] = teacher_params
        # Quantized blocks do not have the weights' shapes: they stay whole on every device.
        frozen_axes["teacher"] = None if q else teacher.model.param_axes()
    stops = tuple(tokenizer.stop_ids) if cfg.sampled else ()
    n = student.num_params()
    log(f"student parameters: {n:,}; teacher: {teacher.model.num_params():,}")
    return Task(
        params=student.init if student_params is None else student_params,
        axes=student.param_axes(),
        loss=make_loss(cfg, student, teacher_model, stops),
        eval_loss=next_token_loss(student),
        train=train_it,
        heldout=heldout,
        model=student_cfg,
        frozen=frozen,
        frozen_axes=frozen_axes,
        identity=identity,
        start_metrics={"student_params": n, "teacher_params": teacher.model.num_params()},
    )


def prepare(cfg: DistillConfig) -> DistillConfig:
    """``cfg`` checked for its teacher and student, with the teacher's absolute path."""
    _check_paths(cfg)
    cfg = dataclasses.replace(cfg, teacher=str(absolute(cfg.teacher)))
    return cfg


def run(cfg: DistillConfig, out_dir, log=print) -> TrainResult:
    """Distil (or resume) in ``out_dir``; the student's held-out loss is ``result.eval_loss``."""
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    cfg = prepare(cfg)
    with rundir.hold(out_dir):
        t = task(cfg, out_dir, log)
        cfg = dataclasses.replace(cfg, model=t.model)
        result = train(cfg, t, out_dir, log=log)
    if result.eval_loss is not None:
        log(f"student held-out perplexity {math.exp(min(result.eval_loss, 700.0)):.3f}")
    return result
