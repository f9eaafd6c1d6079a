"""bench/moe.py computes one function three ways: the layer's dropless grouped matmul, a per-expert
loop and one-hot dispatch einsums agree on outputs and gradients, one-hot's drops are exactly
zeroed routing weights, and the bench's own agreement check runs on a tiny size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moe.py"
spec = importlib.util.spec_from_file_location("bench_moe", BENCH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

N, E, K, D, F = 48, 4, 2, 8, 16


def _outputs(fn, inputs):
    (_, y_ND), grads = bench.step_fn(fn)(*inputs)
    return y_ND, grads


def test_three_implementations_agree_where_nothing_is_dropped():
    inputs = bench.make_inputs(N, E, K, D, F)
    # E / k times the fair share is N slots per expert: room for every token.
    assert bool(bench.kept(inputs[-1], E, E / K).all())
    ref = _outputs(bench.grouped_fn(E, K, D, F), inputs)
    for fn in (bench.per_expert_fn, bench.one_hot_fn(E / K)):
        assert bench.rel_err(_outputs(fn, inputs), ref) <= bench.TOL


def test_one_hot_drops_are_zero_weights_and_the_bench_checks_them(capsys):
    inputs = bench.make_inputs(N, E, K, D, F)  # the inputs main() makes
    keep_NR = bench.kept(inputs[-1], E, 1.0)
    assert 0 < int((~keep_NR).sum()) < N * K  # this routing overflows some expert at factor 1
    grouped = bench.grouped_fn(E, K, D, F)
    one_hot = _outputs(bench.one_hot_fn(1.0), inputs)
    # The comparison sees the drops: against the undropped function it fails, against zeroed
    # weights it holds.
    assert bench.rel_err(one_hot, _outputs(grouped, inputs)) > 1e-2
    zeroed = (*inputs[:4], inputs[4] * keep_NR, inputs[5])
    assert bench.rel_err(one_hot, _outputs(grouped, zeroed)) <= bench.TOL

    rows = bench.main(["--sizes", f"{N}:{E}:{K}", "--d-model", f"{D}", "--mlp", f"{F}",
                       "--capacity-factor", "1.0", "--reps", "1"])  # fmt: skip
    assert [r["impl"] for r in rows] == list(bench.IMPLS)
    assert all(r["rel_err"] <= bench.TOL and r["ms"] > 0 for r in rows)
    assert rows[2]["dropped"] == pytest.approx(float((~keep_NR).mean()))
    assert rows[0]["vs_grouped"] == 1.0
    assert capsys.readouterr().out.count(f"\n| {N} | {E} | {K} |") == 3
