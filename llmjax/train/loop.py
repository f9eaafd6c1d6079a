"""The one training loop. A recipe supplies the config, the model, the data and the loss.

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
from llmjax.data import Data, PackedRows, eval_batches
from llmjax.train import mesh as mesh_lib
from llmjax.train import rundir
from llmjax.train.config import TrainConfig, to_dict
from llmjax.train.metrics import MetricsLog, Progress
from llmjax.train.optim import lr_schedule, make_optimizer
from llmjax.train.step import LossFn, init_state, make_eval_step, make_train_step


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


def model_differences(config: TrainConfig, meta: dict) -> list[str]:
    """``["mlp_dim: 128 -> 64", ...]``: where a checkpoint's model differs from ``config``'s."""
    # Compare as JSON sees them: tuples come back from the checkpoint as lists.
    saved, now = meta["config"]["model"], json.loads(json.dumps(to_dict(config.model)))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in now if saved.get(k) != now[k]]


def _compatible(config: TrainConfig, tokenizer_sha256: str, meta: dict) -> None:
    """Raise ``CheckpointMismatch`` unless ``meta`` is of this model and tokenizer."""
    diff = model_differences(config, meta)
    if diff:
        raise CheckpointMismatch(
            f"the checkpoints in this output directory are of another model ({'; '.join(diff)}); "
            "use a new --out, or the same model settings to resume"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise CheckpointMismatch(
            "the checkpoints in this output directory were trained with another tokenizer "
            "(the data or tokenizer settings changed); use a new --out to start afresh"
        )


@dataclass(frozen=True)
class Evaluation:
    loss: float  # token-weighted mean over every scored token
    sequences: int  # rows evaluated (a last partial batch is left out)
    tokens: int  # tokens scored


def evaluate(
    eval_step, params, rows: PackedRows, batch_size: int, max_batches: int, place=None
) -> Evaluation:
    """The token-weighted mean loss over the first ``max_batches`` held-out batches."""
    total = count = 0.0
    sequences = 0
    for batch in eval_batches(rows, batch_size, max_batches):
        sequences += len(batch["tokens"])
        if place is not None:
            batch = place(batch)
        s, n = eval_step(params, batch)
        total, count = total + float(s), count + float(n)
    return Evaluation(total / max(count, 1.0), sequences, int(count))


def train(
    config: TrainConfig,
    model,
    loss_fn: LossFn,
    data: Data,
    out_dir,
    *,
    eval_loss_fn: LossFn | None = None,
    log=print,
) -> TrainResult:
    """Run (or resume) ``config.loop.steps`` steps, writing checkpoints and metrics to ``out_dir``.

    ``out_dir`` is held for the whole run: a second run on it raises ``RunInUse``.
    """
    with rundir.hold(out_dir):
        return _train(config, model, loss_fn, data, out_dir, eval_loss_fn, log)


def _train(config, model, loss_fn, data, out_dir, eval_loss_fn, log) -> TrainResult:
    loop, out = config.loop, Path(out_dir)
    mesh = mesh_lib.make_mesh(loop.mesh)
    mesh_lib.check_batch(config.data.batch_size, mesh, loop.grad_accum)
    tx = make_optimizer(config.optim, loop.steps)
    schedule = lr_schedule(config.optim, loop.steps)

    init = functools.partial(init_state, model, tx, loop.seed)
    abstract = jax.eval_shape(init)
    rules = mesh_lib.rules_for(mesh, loop.rules)
    shardings = mesh_lib.state_shardings(model, tx, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_sh = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    ckpt_dir = out / "checkpoints"
    restored = restore_latest(
        ckpt_dir, abstract, check=functools.partial(_compatible, config, data.tokenizer.sha256)
    )
    with sharding.activation_rules(mesh, rules):
        if restored is None:
            start, state = 0, jax.jit(init, out_shardings=shardings)()
        else:
            start, state, meta = restored
            data.train.restore(meta["data"])
            log(f"resumed from {ckpt_dir / str(start)} (step {start})")

    step_fn = jax.jit(
        make_train_step(loss_fn, tx, schedule, loop.grad_accum),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(eval_loss_fn or loss_fn),
        in_shardings=(shardings["params"], None),
        out_shardings=replicated,
    )
    ways = sharding.batch_ways(mesh)

    def place(batch):  # a short last held-out batch may not split over the mesh
        target = batch_sh if len(batch["tokens"]) % ways == 0 else replicated
        # Every process holds the same held-out batch: each takes its devices' part of it.
        return {
            k: jax.make_array_from_callback(v.shape, target, lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }

    data.train.local_rows = distributed.process_rows(config.data.batch_size)

    def run_eval(state):
        return evaluate(
            eval_fn,
            state["params"],
            data.heldout,
            config.data.batch_size,
            loop.eval_batches,
            place,
        ).loss

    def meta_for(step, eval_loss):
        return {
            "step": step,
            "data": data.train.state(),
            "config": to_dict(config),
            "tokenizer_sha256": data.tokenizer.sha256,
            "eval_loss": eval_loss,
        }

    ckpt = Checkpointer(ckpt_dir, loop.keep_last, loop.keep_best, loop.async_save)
    main = distributed.is_main_process()  # process 0 writes metrics and shows progress
    metrics = MetricsLog(out, resume_step=start, enabled=main)
    progress = Progress(loop.steps, start, loop.progress and main)
    result = TrainResult(start, state, resumed_from=start if restored else None)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    last_saved = start if restored else None
    # Since the last log line: seconds in data + step only (not eval or saving), steps, loss sum.
    step_time, steps_since_log, loss_sum = 0.0, 0, 0.0

    try:
        with _StopFlag() as stop, sharding.activation_rules(mesh, rules):
            for step in range(start + 1, loop.steps + 1):
                t0 = time.perf_counter()
                batch = sharding.shard_batch(next(data.train), mesh)
                state, m = step_fn(state, batch)
                m = jax.device_get(m)
                loss = float(m["loss"])
                step_time += time.perf_counter() - t0
                steps_since_log += 1
                loss_sum += loss
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

                eval_loss = None
                last = step == loop.steps
                if last or (loop.eval_every and step % loop.eval_every == 0):
                    eval_loss = run_eval(state)
                    result.eval_loss = eval_loss
                    ppl = math.exp(min(eval_loss, 700.0))
                    metrics.write(step, {"eval_loss": eval_loss, "perplexity": ppl})
                    progress.message(
                        f"step {step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}"
                    )

                if step % loop.log_every == 0 or last or step == start + 1:
                    tps = tokens_per_step * steps_since_log / max(step_time, 1e-9)
                    mean_loss = loss_sum / steps_since_log  # one step's loss is a noisy sample
                    rec = {
                        "loss": mean_loss,
                        "learning_rate": float(m["learning_rate"]),
                        "grad_norm": float(m["grad_norm"]),
                        "tokens_per_sec": tps,
                    }
                    rec.update(
                        {
                            k: float(v)
                            for k, v in m.items()
                            if k not in rec and k not in ("tokens",) and np.ndim(v) == 0
                        }
                    )
                    metrics.write(step, rec)
                    progress.update(step, mean_loss, tps)
                    step_time, steps_since_log, loss_sum = 0.0, 0, 0.0

                stopping = stop.signum is not None
                if (
                    last
                    or stopping
                    or eval_loss is not None
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
