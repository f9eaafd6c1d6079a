"""The one training loop. A recipe supplies the config and a ``Task`` (see ``task.py``).

Per step: next batch -> device (sharded over data x fsdp) -> jitted step (state donated) -> check
the loss is finite -> log -> evaluate and save when due. A checkpoint at step ``s`` holds the state
after ``s`` updates and the data iterator's position after ``s`` batches, so a resumed run
continues with exactly the batch the interrupted one would have used next.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import distributed, sharding
from llmjax.checkpoint import Checkpointer, CheckpointMismatch, restore_latest
from llmjax.config import ModelConfig
from llmjax.losses import SUMMED
from llmjax.train import mesh as mesh_lib
from llmjax.train import rundir
from llmjax.train.config import to_dict
from llmjax.train.metrics import MetricsLog, Progress
from llmjax.train.optim import lr_schedule, make_optimizer
from llmjax.train.step import make_eval_step, make_train_step
from llmjax.train.task import Task, place, tree_shardings


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN or infinite; the message names the last good step."""


@dataclass
class TrainResult:
    step: int  # last completed step
    state: dict
    losses: dict[int, float] = field(default_factory=dict)  # every step this process ran
    eval_loss: float | None = None
    stopped: str = "done"  # "done" or "signal"
    signum: int | None = None
    resumed_from: int | None = None
    eval_metrics: dict = field(default_factory=dict)  # the last evaluation's

    @property
    def perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(min(self.eval_loss, 700.0))


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to save and stop after the current step."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def model_differences(config, meta: dict) -> list[str]:
    """``["mlp_dim: 128 -> 64", ...]``: where a checkpoint's model differs from ``config``'s.

    ``config`` is a ``TrainConfig`` (its ``model``) or a ``ModelConfig``.
    """
    from llmjax.config import model_config_from_dict

    model = getattr(config, "model", config)
    saved = meta["config"]["model"]
    # A field added since the checkpoint was written takes its default there: the model it
    # trained is that default's (a dense model has no experts).
    # A config this version cannot rebuild is compared as it was saved.
    with contextlib.suppress(TypeError, ValueError):
        saved = {**to_dict(model_config_from_dict(saved)), **saved}
    # Compare as JSON sees them: tuples come back from the checkpoint as lists.
    saved, now = json.loads(json.dumps(saved)), json.loads(json.dumps(to_dict(model)))
    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in now
        if saved.get(k) != now[k] and k not in SCHEDULE_FIELDS
    ]


# How the step computes, not which model it trains: a run may resume with another of each.
# Scanned or unrolled is how the layers are stored (restore converts); rematerialisation and the
# attention kernel change only what is kept for the backward pass and which kernel runs.
SCHEDULE_FIELDS = ("scan_layers", "remat", "attention_impl")


def _relayout(task, abstract, shardings):
    """``adapt`` for ``restore``: a checkpoint stored with the other layer layout (scanned or
    unrolled; runs saved before scanning became the default are unrolled) is read in its own
    layout and converted to this run's on the devices."""
    from llmjax.config import model_config_from_dict
    from llmjax.models.scan import relayout

    model = task.model if isinstance(task.model, ModelConfig) else None

    def adapt(meta):
        saved = meta.get("config", {}).get("model")
        if model is None or not isinstance(saved, dict):
            return abstract, None
        with contextlib.suppress(TypeError, ValueError):
            scanned = model_config_from_dict(saved).scan_layers
            if scanned != model.scan_layers:
                convert = jax.jit(
                    lambda s: relayout(model, s, model.scan_layers), out_shardings=shardings
                )
                return relayout(model, abstract, scanned), convert
        return abstract, None

    return adapt


# What each identity key means, for the message when a checkpoint's differs.
_IDENTITY_FIXES = {
    "tokenizer_sha256": "were trained with another tokenizer (the data or tokenizer settings "
    "changed); use a new --out to start afresh",
    "data_fingerprint": "were trained on other data or data settings (file contents, sequence "
    "length, batch size, seed); use a new --out, or the same data to resume",
    "base": "were trained from another base model; use a new --out, or the same --base to resume",
    "trainable": "train another set of parameters (LoRA or trainable settings changed); use a new "
    "--out, or the same settings to resume",
    "teacher": "were distilled from another teacher (its files' hash differs); use a new --out, "
    "or the same --teacher to resume",
    "student_start": "started the student from another model; use a new --out, or the same "
    "--student to resume",
    "distill": "were trained with other distillation settings ({diff}); use a new --out, or the "
    "same settings to resume",
    "preference": "were trained with other preference settings ({diff}); use a new --out, or the "
    "same settings to resume",
    "rl": "were trained with other RL settings ({diff}); use a new --out, or the same settings "
    "to resume",
    "head": "are of another kind of run (a reward model's scalar head, or none); use a new --out",
}


def _setting_changes(saved, now) -> str:
    if not (isinstance(saved, dict) and isinstance(now, dict)):
        return f"was {saved!r}, now {now!r}"
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return ", ".join(f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in keys)


def _compatible(task, meta: dict) -> None:
    """Raise ``CheckpointMismatch`` unless ``meta`` was written by this same task."""
    diff = model_differences(task.model, meta) if task.model is not None else []
    if diff:
        raise CheckpointMismatch(
            f"the checkpoints in this output directory are of another model ({'; '.join(diff)}); "
            "use a new --out, or the same model settings to resume"
        )
    saved = meta.get("identity", {"tokenizer_sha256": meta.get("tokenizer_sha256")})
    for key, value in task.identity.items():
        now = json.loads(json.dumps(value))
        if key in saved and saved[key] != now:
            fix = _IDENTITY_FIXES.get(key, f"differ in {key} ({{diff}}); use a new --out")
            why = fix.format(diff=_setting_changes(saved[key], now))
            raise CheckpointMismatch(f"the checkpoints in this output directory {why}")


@dataclass(frozen=True)
class Evaluation:
    loss: float  # token-weighted mean over every scored token
    sequences: int  # rows evaluated (a last partial batch is left out)
    tokens: int  # tokens scored
    metrics: dict = field(default_factory=dict)  # the loss's other metrics, token-weighted


def evaluate(eval_step, params, batches, *, frozen=None, place=None) -> Evaluation:
    """Pool ``eval_step`` (``make_eval_step``) over ``batches``, weighting each by its tokens."""
    sums, count, sequences = {}, 0.0, 0
    for batch in batches:
        sequences += len(batch["tokens"])
        if place is not None:
            batch = place(batch)
        s, n = jax.device_get(eval_step(params, frozen or {}, batch))
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += float(n)
    means = {k: v / max(count, 1.0) for k, v in sums.items()}
    return Evaluation(means.pop("loss", float("nan")), sequences, int(count), means)


def train(config, task: Task, out_dir, *, log=print) -> TrainResult:
    """Run (or resume) ``config.loop.steps`` steps of ``task``, writing checkpoints and metrics.

    ``config`` supplies ``optim``, ``loop`` and ``data.batch_size`` and is recorded in every
    checkpoint. ``out_dir`` is held for the whole run: a second run on it raises ``RunInUse``.
    """
    with rundir.hold(out_dir):
        return _train(config, task, out_dir, log)


def _initial_state(task: Task, tx, seed: int, shardings) -> dict:
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    if callable(task.params):
        params = jax.jit(task.params, out_shardings=shardings["params"])(init_key)
    else:
        params = place(task.params, shardings["params"])
    return {
        "step": place(np.zeros((), np.int32), shardings["step"]),
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
        "rng": place(np.asarray(jax.device_get(rng)), shardings["rng"]),
    }


def _shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _train(config, task: Task, out_dir, log) -> TrainResult:
    loop, out = config.loop, Path(out_dir)
    batch_size = config.data.batch_size
    mesh = mesh_lib.make_mesh(loop.mesh)
    mesh_lib.check_batch(batch_size, mesh, loop.grad_accum)
    updates = loop.steps * task.updates_per_batch  # the schedule counts optimizer updates
    # The model config carries the router's bias-update speed (an update outside Adam).
    model_cfg = task.model if isinstance(task.model, ModelConfig) else None
    tx = make_optimizer(config.optim, updates, model=model_cfg)
    schedule = lr_schedule(config.optim, updates)
    rules = mesh_lib.rules_for(mesh, loop.rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    abstract_params = (
        jax.eval_shape(task.params, jax.random.PRNGKey(0))
        if callable(task.params)
        else _shapes(task.params)
    )
    params_sh = tree_shardings(task.axes, abstract_params, mesh, rules)
    shardings = {
        "step": replicated,
        "params": params_sh,
        "opt_state": sharding.optimizer_shardings(tx, params_sh, abstract_params, mesh),
        "rng": replicated,
    }
    abstract = {
        "step": jax.ShapeDtypeStruct((), np.int32),
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
        "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0)),
    }
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    frozen_sh = {
        k: tree_shardings(task.frozen_axes.get(k), _shapes(v), mesh, rules)
        for k, v in task.frozen.items()
    }
    frozen = {k: place(v, frozen_sh[k]) for k, v in task.frozen.items()}
    batch_sh = sharding.batch_sharding(mesh)

    ckpt_dir = out / "checkpoints"
    restored = restore_latest(
        ckpt_dir,
        abstract,
        check=functools.partial(_compatible, task),
        adapt=_relayout(task, abstract, shardings),
    )
    with sharding.activation_rules(mesh, rules):
        if restored is None:
            start, state, num_tokens = 0, _initial_state(task, tx, loop.seed, shardings), 0.0
        else:
            start, state, meta = restored
            task.train.restore(meta["data"])
            num_tokens = float(meta.get("num_tokens", 0.0))
            log(f"resumed from {ckpt_dir / str(start)} (step {start})")

    step_fn = jax.jit(
        make_train_step(task.loss, tx, schedule, loop.grad_accum, task.updates_per_batch),
        in_shardings=(shardings, frozen_sh, batch_sh),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(task.eval_loss or task.loss),
        in_shardings=(params_sh, frozen_sh, None),
        out_shardings=replicated,
    )
    ways = sharding.batch_ways(mesh)

    def place_batch(batch):  # a short last held-out batch may not split over the mesh
        target = batch_sh if len(batch["tokens"]) % ways == 0 else replicated
        # Every process holds the same held-out batch: each takes its devices' part of it.
        return {
            k: jax.make_array_from_callback(v.shape, target, lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }

    task.train.local_rows = distributed.process_rows(batch_size)
    # Its own stream: the step's key (state["rng"]) must not depend on whether rollouts ran.
    rollout_key = jax.random.fold_in(jax.random.PRNGKey(loop.seed), 0x5A5)

    def run_eval(state) -> dict:
        metrics = {}
        if task.heldout is not None:  # RL has no held-out loss, only task.evaluate's metrics
            result = evaluate(
                eval_fn,
                state["params"],
                task.heldout(batch_size, loop.eval_batches),
                frozen=frozen,
                place=place_batch,
            )
            metrics["eval_loss"] = result.loss
            if task.eval_perplexity:
                metrics["perplexity"] = math.exp(min(result.loss, 700.0))
            metrics.update({f"eval_{k}": v for k, v in result.metrics.items() if k != "nll"})
        if task.evaluate is not None:
            metrics.update(task.evaluate(state["params"], frozen))
        return metrics

    def meta_for(step, eval_loss):
        return {
            "step": step,
            "data": task.train.state(),
            "config": to_dict(config),
            **{k: v for k, v in task.identity.items() if k == "tokenizer_sha256"},
            "identity": task.identity,
            "num_tokens": num_tokens,
            "eval_loss": eval_loss,
        }

    ckpt = Checkpointer(ckpt_dir, loop.keep_last, loop.keep_best, loop.async_save)
    main = distributed.is_main_process()  # process 0 writes metrics and shows progress
    metrics = MetricsLog(out, resume_step=start, enabled=main)
    progress = Progress(loop.steps, start, loop.progress and main)
    if restored is None and task.start_metrics:
        metrics.write(0, task.start_metrics)
    result = TrainResult(start, state, resumed_from=start if restored else None)
    last_saved = start if restored else None
    # Since the last log line: seconds in data + step only (not eval or saving), steps, the sums
    # of the loss and of the real tokens processed.
    step_time, steps_since_log, loss_sum, tokens_since_log = 0.0, 0, 0.0, 0.0

    try:
        with _StopFlag() as stop, sharding.activation_rules(mesh, rules):
            for step in range(start + 1, loop.steps + 1):
                t0 = time.perf_counter()
                batch = sharding.shard_batch(next(task.train), mesh)
                rolled = {}
                if task.rollout is not None:
                    key = jax.random.fold_in(rollout_key, step)
                    batch, rolled = task.rollout(state["params"], frozen, batch, key, step)
                state, m = step_fn(state, frozen, batch)
                m = {**jax.device_get(m), **rolled}
                loss = float(m["loss"])
                step_time += time.perf_counter() - t0
                steps_since_log += 1
                loss_sum += loss
                step_tokens = float(m.get("num_tokens", batch["tokens"].size))
                tokens_since_log += step_tokens
                num_tokens += step_tokens
                if step == start + 1:
                    log(f"compiled and ran the first step in {step_time:.1f}s")
                if not (math.isfinite(loss) and math.isfinite(float(m["grad_norm"]))):
                    ckpt.wait()
                    where = (
                        f"the last good checkpoint is step {last_saved} in {ckpt_dir}"
                        if last_saved is not None
                        else "no checkpoint was saved"
                    )
                    raise TrainingDiverged(
                        f"loss {loss} / grad norm {float(m['grad_norm'])} at step {step} is not "
                        f"finite; stopped without saving it: {where} (lower optim.lr or raise "
                        f"optim.warmup_steps, then rerun to resume)"
                    )
                result.losses[step] = loss
                result.step, result.state = step, state

                eval_loss, evaluated = None, False
                last = step == loop.steps
                if last or (loop.eval_every and step % loop.eval_every == 0):
                    evals, evaluated = run_eval(state), True
                    eval_loss = result.eval_loss = evals.get("eval_loss")
                    result.eval_metrics = evals
                    metrics.write(step, evals)
                    shown = [] if eval_loss is None else [f"eval loss {eval_loss:.4f}"]
                    if "perplexity" in evals:
                        shown.append(f"perplexity {evals['perplexity']:.2f}")
                    shown += [
                        f"{k.removeprefix('eval_')} {v:.4g}"
                        for k, v in evals.items()
                        if k not in ("eval_loss", "perplexity")
                    ]
                    progress.message(f"step {step}: {', '.join(shown)}")

                if step % loop.log_every == 0 or last or step == start + 1:
                    tps = tokens_since_log / max(step_time, 1e-9)
                    mean_loss = loss_sum / steps_since_log  # one step's loss is a noisy sample
                    rec = {
                        "loss": mean_loss,
                        "learning_rate": float(m["learning_rate"]),
                        "grad_norm": float(m["grad_norm"]),
                        "tokens_per_sec": tps,
                        "num_tokens": num_tokens,
                    }
                    rec.update(
                        {
                            k: float(v)
                            for k, v in m.items()
                            if k not in rec and k not in SUMMED and np.ndim(v) == 0
                        }
                    )
                    metrics.write(step, rec)
                    progress.update(step, mean_loss, tps)
                    step_time, steps_since_log, loss_sum, tokens_since_log = 0.0, 0, 0.0, 0.0

                stopping = stop.signum is not None
                if (
                    last
                    or stopping
                    or evaluated
                    or (loop.save_every and step % loop.save_every == 0)
                ):
                    ckpt.save(step, state, meta_for(step, eval_loss), eval_loss)
                    last_saved = step
                if stopping:
                    result.stopped, result.signum = "signal", stop.signum
                    progress.message(
                        f"stopping at step {step} on signal {stop.signum}; "
                        f"checkpoint saved to {ckpt_dir / str(step)}"
                    )
                    break
    except BaseException:
        with contextlib.suppress(Exception):
            ckpt.close()  # the error in flight is the one to report
        raise
    else:
        ckpt.close()  # waits for the last save; raises if it failed, so no failed save passes
    finally:
        progress.close()
        metrics.close()
    return result
