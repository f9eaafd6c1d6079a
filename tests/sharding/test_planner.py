"""The memory planner against XLA's compiled memory analysis, and its command line."""

from __future__ import annotations

from pathlib import Path

import pytest

import llmjax
from llmjax.sharding import planner
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


def _plan_output(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def _total_and_verdict(out: str) -> tuple[float, bool]:
    total = float(next(ln for ln in out.splitlines() if ln.startswith("total")).split()[1])
    return total, "does NOT fit" not in out.split("total")[1].splitlines()[1]


@pytest.mark.parametrize(
    "argv",
    [
        # Activations dominate: remat alone is enough.
        ["--mesh", "fsdp=8", "--batch", "8", "--seq-len", "4096", "--hbm", "40"],
        # Nothing alone is enough: remat and bfloat16 together, then more devices.
        ["--batch", "8", "--seq-len", "4096", "--hbm", "16"],
    ],
    ids=["remat-fits", "only-together"],
)
def test_suggestions_are_replanned_and_the_fitting_ones_fit(capsys, argv):
    """Each suggested change, applied to the same command, plans to the total and verdict shown."""
    base = ["--preset", "llama3-8b", *argv]
    out = _plan_output(capsys, base)
    assert "does NOT fit in" in out
    rows = out.split("re-planned with each change (total per device):\n")[1].splitlines()
    assert rows
    fitting = 0
    for row in rows:
        flags, rest = row.strip().split("  ", 1)
        shown = float(rest.split()[0])
        fits = rest.rstrip().endswith(" fits")
        total, replanned_fits = _total_and_verdict(_plan_output(capsys, base + flags.split()))
        assert total == pytest.approx(shown, abs=1e-3), row
        assert fits == replanned_fits, row
        fitting += fits
    assert fitting >= 1


def test_a_plan_that_fits_suggests_nothing(capsys):
    out = _plan_output(
        capsys, ["--preset", "llama3-tiny", "--batch", "8", "--seq-len", "64", "--hbm", "80"]
    )
    assert "fits in 80.0 GiB" in out and "re-planned" not in out


def test_plan_help_shows_every_default(capsys):
    from llmjax.cli import HelpFormatter
    from llmjax.cli import main as cli_main

    p = planner.parser()
    for action in p._actions:
        if action.dest == "help":
            continue
        shown = HelpFormatter("llmjax plan")._get_help_string(action)
        assert action.help and (action.required or "default" in shown), action.dest
    assert cli_main(["plan", "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: adamw)" in text and "(default: the preset's)" in text
