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
        ["--devices", "8", "--mesh", "fsdp=2,expert=4", "--rules", "ep"],
        pytest.param(
            ["--devices", "8", "--mesh", "data=2,fsdp=4", "--rules", "fsdp"], marks=pytest.mark.slow
        ),
    ],
    ids=["one-device", "fsdp4-tensor2", "fsdp2-expert4", "data2-fsdp4"],
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


def test_plan_counts_expert_weights_and_dispatch_buffers(capsys):
    cfg = llmjax.build("mixtral-8x7b").config
    E, D, F, L = cfg.n_experts, cfg.d_model, cfg.resolved_expert_mlp_dim, cfg.n_layers
    expert_bytes = 4 * L * (3 * E * D * F + D * E)  # gate, up, down and the router, float32
    one = plan(cfg, "fsdp=16", batch_size=16, seq_len=1024, rules="fsdp", remat="dots")
    assert one.expert_params == expert_bytes // 16
    ep = plan(cfg, "fsdp=2,expert=8", batch_size=16, seq_len=1024, rules="ep", remat="dots")
    assert ep.expert_params == expert_bytes // 16  # experts over expert, embed over fsdp
    # Gathering an expert group's tokens: every device holds buffers for the group's
    # assignments, expert x k rows per local token instead of k.
    assert 0 < one.dispatch < one.activations and ep.dispatch > 6 * one.dispatch
    dense = plan(llmjax.build("llama3.1-8b").config, "fsdp=8", batch_size=8, seq_len=4096)
    assert dense.expert_params == dense.dispatch == 0
    assert main(["--preset", "mixtral-8x7b", "--mesh", "fsdp=2,expert=8", "--batch", "16",
                 "--seq-len", "1024"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "rules ep," in out and "of which experts" in out and "of which MoE" in out


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


def test_plan_counts_chunked_logits_and_reports_the_saving(capsys):
    """The loss's chunked cross-entropy keeps one float32 [chunk, V] block and a float32 [D, V]
    head-gradient accumulator instead of [tokens, V] logits and their gradient; the table shows
    the logits' share and the saving."""
    cfg = llmjax.build("llama3.1-8b").config
    V, D = cfg.vocab_size, cfg.d_model
    kw = dict(batch_size=8, seq_len=16384, rules="fsdp", remat="full")
    chunked, full = plan(cfg, "fsdp=8", **kw), plan(cfg, "fsdp=8", **kw, ce_chunk=0)
    tokens = 16384  # per device: one sequence each
    assert full.logits == full.full_logits == tokens * 2 * 4 * V
    assert chunked.logits == 4 * V * (1024 + D) and chunked.full_logits == full.logits
    saved = full.activations - chunked.activations
    assert saved == full.logits - chunked.logits and saved > 13 * 2**30
    assert full.total - chunked.total == saved
    # Chunks of equal size: 1000 tokens per device in one chunk of 1000 rows, not 1024.
    short = plan(cfg, "fsdp=8", batch_size=8, seq_len=1000, rules="fsdp", remat="full")
    assert short.logits == 4 * V * (1000 + D)
    # The vocabulary split over tensor splits both buffers.
    tp = plan(cfg, "fsdp=4,tensor=2", **kw | {"rules": "fsdp_tp"})
    assert tp.logits == 4 * (V // 2) * (1024 + D)

    argv = ["--preset", "llama3-8b", "--mesh", "fsdp=8", "--batch", "8", "--seq-len", "16384"]
    out = _plan_output(capsys, argv)
    gib = (full.logits - chunked.logits) / 2**30
    assert f"chunked cross-entropy (1024 tokens per step) saves {gib:.3f} GiB" in out
    assert "of which logits" in out
    out = _plan_output(capsys, [*argv, "--ce-chunk", "0"])
    assert "chunked cross-entropy" not in out and "of which logits" in out
    with pytest.raises(ValueError, match="ce_chunk"):
        plan(cfg, "fsdp=8", **kw, ce_chunk=-1)
