import dataclasses
import math
import shutil
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llmjax
from llmjax.checkpoint import step_dirs
from llmjax.data import build_data
from llmjax.recipes import pretrain
from llmjax.train import (
    TrainingDiverged,
    make_train_step,
    next_token_loss,
    train,
)
from llmjax.train.metrics import read_metrics
from llmjax.train.tensorboard import read_events
from tests.train.helpers import replace, small_config


def run(cfg, out, loss=None):
    model = llmjax.build(cfg.model)
    data = build_data(cfg.data, out, cfg.model.vocab_size)
    task = pretrain.task(cfg, model, data)
    if loss is not None:
        task = dataclasses.replace(task, loss=loss)
    return train(cfg, task, out, log=lambda *_: None)


def test_loss_falls_within_a_few_dozen_steps(tmp_path):
    cfg = small_config(steps=40, eval_every=20, log_every=5)
    result = run(cfg, tmp_path)
    first = np.mean([result.losses[s] for s in range(1, 6)])
    last = np.mean([result.losses[s] for s in range(36, 41)])
    assert last < first - 1.0, (first, last)
    assert result.eval_loss < min(first, math.log(cfg.model.vocab_size)) - 0.75
    # metrics.jsonl: one object per logged step, eval entries with perplexity.
    recs = read_metrics(tmp_path)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    assert all({"learning_rate", "tokens_per_sec", "grad_norm"} <= r.keys() for r in train_recs)
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    # The same numbers in TensorBoard's format.
    (events,) = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    tb = [e for e in read_events(events) if "scalars" in e and "loss" in e["scalars"]]
    assert [e["step"] for e in tb] == [r["step"] for r in train_recs]
    np.testing.assert_allclose(
        [e["scalars"]["loss"] for e in tb], [r["loss"] for r in train_recs], rtol=1e-6
    )
    # Kept: the newest 3 (20, 30, 40 with save_every=3 and eval steps) plus the best eval (40).
    assert step_dirs(tmp_path / "checkpoints") == [40, 39, 36]


def test_grad_accumulation_weights_micro_batches_by_their_tokens(tmp_path):
    """Two micro-batches with very unequal loss masks give exactly one step on the whole batch."""
    cfg = small_config()
    model = llmjax.build(cfg.model)
    data = build_data(cfg.data, tmp_path, cfg.model.vocab_size)
    batch = dict(next(data.train))
    mask = np.ones_like(batch["loss_mask"])
    mask[: len(mask) // 2, 3:] = 0  # the first half scores 3 tokens a row, the second all
    batch = jax.tree.map(jnp.asarray, {**batch, "loss_mask": mask})
    tx = optax.sgd(1.0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    state = {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jax.random.PRNGKey(1),
    }
    loss = next_token_loss(model, accuracy=True)
    one, m1 = jax.jit(make_train_step(loss, tx, grad_accum=1))(state, {}, batch)
    two, m2 = jax.jit(make_train_step(loss, tx, grad_accum=2))(state, {}, batch)
    for k in ("loss", "grad_norm", "mean_token_accuracy", "tokens", "num_tokens"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, err_msg=k)
    assert float(m1["tokens"]) == mask.sum()
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert int(two["step"]) == 1
    # The old rule (the mean of the micro-batches' means) is measurably different here.
    n = len(mask) // 2
    halves = [jax.tree.map(lambda x, i=i: x[i * n : i * n + n], batch) for i in range(2)]
    mean_of_means = np.mean([float(loss(params, {}, h, None)[0]) for h in halves])
    assert abs(mean_of_means - float(m1["loss"])) > 1e-3


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = small_config(steps=6)
    run(cfg, tmp_path)
    assert step_dirs(tmp_path / "checkpoints")[0] == 6
    model = llmjax.build(cfg.model)
    good = next_token_loss(model)

    def poisoned(params, frozen, batch, rng):
        loss, aux = good(params, frozen, batch, rng)
        return loss * jnp.nan, aux

    cfg = replace(cfg, loop=replace(cfg.loop, steps=12))
    with pytest.raises(TrainingDiverged, match="last good checkpoint is step 6"):
        run(cfg, tmp_path, loss=poisoned)
    assert step_dirs(tmp_path / "checkpoints")[0] == 6  # nothing written after the NaN


# Orbax abandons the other reads of a failed restore; their late wake-ups of its closed event
# loop used to print one traceback each (`_quiet_orphaned_reads`). Any such report fails here.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_and_partial_latest_checkpoints_are_skipped(tmp_path, capsys):
    cfg = small_config(steps=9)
    # A constant rate after warmup, so a 9-step run resumed to 12 is a 12-step run.
    cfg = replace(cfg, optim=replace(cfg.optim, schedule="constant"))
    first = run(cfg, tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints"
    assert step_dirs(ckpt) == [9, 6, 3]
    # Step 9: its array files damaged. Step 12: a bare directory, as a kill can leave behind.
    for f in (ckpt / "9" / "state").rglob("*"):
        if f.is_file() and f.name != "_METADATA":
            f.write_bytes(b"\0" * 7)
    (ckpt / "12").mkdir()
    cfg12 = replace(cfg, loop=replace(cfg.loop, steps=12))
    capsys.readouterr()
    resumed = run(cfg12, tmp_path / "a")
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "checkpoints/" in ln]
    assert len(notes) == 2, notes  # one line per damaged step
    assert "checkpoints/12 is incomplete" in notes[0] and "resuming from step 6" in notes[0]
    assert "checkpoints/9 is damaged" in notes[1]
    assert resumed.resumed_from == 6
    # The steps replayed from 6 are exactly those of an uninterrupted 12-step run.
    fresh = run(cfg12, tmp_path / "b")
    assert {s: resumed.losses[s] for s in range(7, 13)} == {
        s: fresh.losses[s] for s in range(7, 13)
    }
    assert first.losses[1] == fresh.losses[1]
    assert sorted(p.name.split(".")[0] for p in ckpt.glob("*.invalid-*")) == ["12", "9"]
    shutil.rmtree(tmp_path / "b")


def test_bfloat16_remat_accumulation_and_z_loss(tmp_path):
    cfg = small_config(steps=8, grad_accum=2, z_loss=1e-4)
    cfg = replace(cfg, model=cfg.model.replace(dtype="bfloat16", remat="full"))
    result = run(cfg, tmp_path)
    assert all(math.isfinite(v) for v in result.losses.values())
    assert result.losses[8] < result.losses[1] - 0.3
    assert result.state["params"]["embed"].dtype == jnp.float32  # params stay in param_dtype
    assert "z_loss" in read_metrics(tmp_path)[-1]


def test_quiet_orphaned_reads_passes_other_reports_on():
    """Only "Event loop is closed" is swallowed; every other report reaches the previous hook,
    which is back in place after a success, and behind a filter of stragglers after a failure."""
    from llmjax.checkpoint.manager import _quiet_orphaned_reads

    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(str(u.exc_value))
    try:
        mine = sys.unraisablehook
        with _quiet_orphaned_reads(settle_s=0.01):
            sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
        assert sys.unraisablehook is mine
        with pytest.raises(ValueError, match="damaged"), _quiet_orphaned_reads(settle_s=0.01):
            sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
            sys.unraisablehook(_unraisable(RuntimeError("something else")))
            raise ValueError("damaged")
        sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))  # a straggler
        sys.unraisablehook(_unraisable(RuntimeError("after")))
    finally:
        sys.unraisablehook = previous
    assert seen == ["something else", "after"]


def _unraisable(exc):
    return types.SimpleNamespace(
        exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=None
    )
