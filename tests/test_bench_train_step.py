"""bench/train_step.py runs in both layer layouts and reports a sane step, and the MaxText side
by side builds a command it accepts (on a tiny shape: the timing itself is not a test)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--d-model", "64", "--layers", "2", "--heads", "2", "--mlp", "128", "--vocab", "256"]
TINY += ["--seq-len", "16", "--batch-size", "2", "--steps", "2"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_train_step_bench_reports_a_step(layout, capsys):
    _load("train_step").main([*TINY, "--layout", layout])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["scan_layers"] == (layout == "scanned")
    assert (r["layers"], r["d_model"], r["heads"], r["mlp"], r["vocab"]) == (2, 64, 2, 128, 256)
    assert r["step_time_s"] > 0 and r["tokens_per_sec"] == pytest.approx(
        32 / r["step_time_s"], rel=0.05
    )
    assert 0 < r["mfu"] < 1
    # Random tokens over 256 ids: the loss starts near log(256) and two AdamW steps barely move it.
    assert abs(r["final_loss"] - math.log(256)) < 1.0


def test_side_by_side_runs_the_step_bench_it_documents(monkeypatch):
    side = _load("maxtext_side_by_side")
    shape = {"d_model": 64, "layers": 2, "heads": 2, "head_dim": 32, "mlp": 128}
    monkeypatch.setattr(side, "SHAPE", shape | {"seq_len": 16, "batch_size": 2, "vocab": 256})
    r = side.run_llmjax(steps=2)
    assert r["tokens_per_sec"] == pytest.approx(32 / r["step_time_s"], rel=0.05)
