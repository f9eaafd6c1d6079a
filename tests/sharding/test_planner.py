"""The memory planner against XLA's compiled memory analysis, and its command line."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmjax
from llmjax.sharding.planner import main, plan
from tests.sharding.util import run_module

ROOT = Path(__file__).resolve().parents[2]


def _probe(*args):
    return run_module("tests.sharding.memory_probe", args)


@pytest.mark.parametrize(
    "mesh",
    [
        ["--devices", "1"],
        ["--devices", "8", "--mesh", "fsdp=4,tensor=2", "--rules", "fsdp_tp"],
        pytest.param(
            ["--devices", "8", "--mesh", "data=2,fsdp=4", "--rules", "fsdp"], marks=pytest.mark.slow
        ),
    ],
    ids=["one-device", "fsdp4-tensor2", "data2-fsdp4"],
)
def test_plan_within_20_percent_of_compiled_memory(mesh):
    for row in _probe(*mesh):
        ratio = row["plan"] / row["compiled"]
        assert 0.8 <= ratio <= 1.2, f"{row['case']}: plan/compiled = {ratio:.2f}"


def test_plan_exact_parts_and_fit():
    cfg = llmjax.build("llama3.1-8b").config
    p = plan(cfg, "fsdp=8", batch_size=8, seq_len=4096, rules="fsdp", remat="full")
    assert p.params == pytest.approx(8_030_261_248 * 4 / 8, rel=1e-3)  # fp32, sharded 8 ways
    assert p.grads == p.params and p.optimizer == 2 * p.params
    assert p.fits(80 * 2**30) and not p.fits(20 * 2**30)
    bf16 = plan(cfg.replace(dtype="bfloat16"), "fsdp=8", batch_size=8, seq_len=4096, remat="full")
    assert bf16.activations < p.activations
    with pytest.raises(ValueError, match="not divisible by data x fsdp x expert = 8"):
        plan(cfg, "fsdp=8", batch_size=4, seq_len=128)


def test_plan_command_prints_table(capsys):
    assert (
        main(
            [
                "--preset",
                "llama3-8b",
                "--mesh",
                "fsdp=8",
                "--batch",
                "8",
                "--seq-len",
                "4096",
                "--hbm",
                "80",
                "--remat",
                "full",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "llama3.1-8b: 8,030,261,248 parameters" in out
    for row in (
        "parameters",
        "gradients",
        "optimizer state",
        "activations",
        "total",
        "fits in 80.0",
    ):
        assert row in out
