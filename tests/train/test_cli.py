"""The command line end to end on a small run, and one clear error per bad input."""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint import read_meta
from llmjax.cli import HelpFormatter, build_pretrain_config, main, parser
from llmjax.cli_eval import heldout_rows
from llmjax.data import DataConfig, Tokenizer, TokenizerConfig
from llmjax.data.pipeline import load_documents
from llmjax.recipes import pretrain
from llmjax.runs import load_run
from llmjax.train.metrics import read_metrics
from tests.train.helpers import cli_args, corpus_paths


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def test_pretrain_outputs(run_dir):
    assert (run_dir / "metrics.jsonl").is_file()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    meta = json.loads((run_dir / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["step"] == 8 and meta["config"]["model"]["name"] == "llama3-tiny"
    assert meta["data"]["index"] + meta["data"]["epoch"] > 0


def test_eval_generate_on_checkpoint(run_dir, capsys):
    assert (
        main(["eval", "--ckpt", str(run_dir), "--data", *corpus_paths(), "--max-batches", "2"]) == 0
    )
    out = capsys.readouterr().out
    ppl = float(out.split("perplexity ")[1].split()[0])
    assert 1 < ppl < 512
    assert (
        main(
            [
                "generate",
                "--ckpt",
                str(run_dir / "checkpoints"),
                "--prompt",
                "The ",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("The ")


def test_export_matches_the_checkpoint(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    assert main(["export", "--ckpt", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    run = load_run(str(run_dir))
    model, params = run.model, run.params
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokens = np.array([[2, 40, 41, 42, 43, 44, 45, 46]])
    ours = np.asarray(model.apply(params, jnp.asarray(tokens)))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


def test_load_run_restores_only_the_parameters(run_dir):
    """Sampling and export read the parameters alone; they equal a full restore's bit for bit."""
    import jax

    from llmjax.checkpoint.manager import resolve_checkpoint, restore
    from llmjax.train.config import OptimizerConfig
    from llmjax.train.optim import make_optimizer
    from llmjax.train.step import init_state

    run = load_run(str(run_dir))
    cfg = run.meta["config"]
    tx = make_optimizer(OptimizerConfig(**cfg["optim"]), cfg["loop"]["steps"])
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(lambda: init_state(run.model, tx, 0)),
    )
    full, _ = restore(resolve_checkpoint(run_dir), abstract)
    assert set(full) == {"step", "params", "opt_state", "rng"}
    same = jax.tree.map(
        lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), run.params, full["params"]
    )
    assert all(jax.tree.leaves(same))
    partial, _ = restore(run.step_dir, {"params": abstract["params"]}, partial=True)
    assert set(partial) == {"params"}


def test_plot(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tokenizer_train(tmp_path):
    out = tmp_path / "tok.model"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                *corpus_paths(),
                "--vocab-size",
                "400",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400
    text = "To be, or not to be:\n\tthat is the question.\n"
    assert tok.decode(tok.encode(text)) == text


def test_resuming_with_another_model_is_refused(run_dir, capsys):
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    code = main(cli_args(run_dir, steps=10, extra=["--set", "model.mlp_dim=64"]))
    err = capsys.readouterr().err
    assert code == 2 and "mlp_dim: 128 -> 64" in err and "use a new --out" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


# --- a command line that explains itself ---------------------------------------------------------


def _subparsers(p):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_help_lists_every_command_and_every_default(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    commands = ("pretrain", "sft", "distill", "dpo", "reward", "grpo", "ppo", "eval", "generate")
    for command in (*commands, "export", "plot", "plan"):
        assert re.search(rf"^    {command}\s+\w", top, re.M) or f"    {command}\n" in top, command
    checked = set()
    for name, sub in _subparsers(parser()):
        for action in sub._actions:
            if action.dest == "help" or isinstance(action, argparse._SubParsersAction):
                continue
            shown = HelpFormatter(name)._get_help_string(action)
            assert action.help, f"{name} {action.dest}"
            assert action.required or not action.option_strings or "default" in shown, (
                f"{name} {action.dest}: {shown}"
            )
            checked.add(name)
    assert {"pretrain", "eval", "export", "plot", "tokenizer train"} <= checked
    assert main(["pretrain", "--help"]) == 0
    text = capsys.readouterr().out
    for recipe in pretrain.RECIPES:
        assert recipe in text
    assert "(default: runs/pretrain)" in text and "default: the recipe's" in text
    assert main(["eval", "--help"]) == 0
    assert "(default: 8)" in capsys.readouterr().out


def test_an_unknown_set_key_suggests_the_closest(tmp_path, capsys):
    code = main(cli_args(tmp_path / "out", steps=2, extra=["--set", "lr=1e-3"]))
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "llmjax pretrain: error: unknown config key 'lr'; did you mean optim.lr?"
    ]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_data_and_tokenizer_paths_are_saved_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(
        ["pretrain", "--data", "a.txt", "texts/*.jsonl", "--tokenizer", "tok.model"]
    )
    cfg = build_pretrain_config(args)
    assert cfg.data.paths == (str(tmp_path / "a.txt"), str(tmp_path / "texts" / "*.jsonl"))
    assert cfg.data.tokenizer == str(tmp_path / "tok.model")


def _relative_args(out: str, steps: int, cwd: Path) -> list[str]:
    """``cli_args`` with the corpus given relative to ``cwd``, as a user in ``cwd`` types it."""
    args = cli_args(out, steps=steps)
    return [os.path.relpath(a, cwd) if a in corpus_paths() else a for a in args]


def test_a_finished_run_says_where_it_saved_and_what_next(run_dir, tmp_path, monkeypatch, capsys):
    """Resumed from relative data paths (saved absolute, so the tokenizer and data match)."""
    shutil.copytree(run_dir, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(_relative_args("run", 12, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "saved run/checkpoints/12; next:\n" in out
    assert "  llmjax generate --ckpt run --prompt " in out and "  llmjax eval --ckpt run\n" in out
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    m = re.search(
        r"training loss \(mean of steps 9-10\) ([\d.]+) -> \(mean of steps 11-12\) ([\d.]+)", out
    )
    assert m, out  # four steps this time: two-step windows at each end
    assert float(m.group(1)) == pytest.approx((losses[9] + losses[10]) / 2, abs=1e-4)
    assert float(m.group(2)) == pytest.approx((losses[11] + losses[12]) / 2, abs=1e-4)
    # The config keeps the data as absolute paths: the suggested eval works from anywhere.
    saved = read_meta(tmp_path / "run" / "checkpoints" / "12")["config"]["data"]["paths"]
    assert saved == list(corpus_paths())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["eval", "--ckpt", "../run", "--max-batches", "1"]) == 0
    assert "from the run's held-out split" in capsys.readouterr().out


def test_loss_summary_names_its_windows():
    losses = {s: float(s) for s in range(1, 301)}
    assert pretrain.loss_summary(losses) == (
        "training loss (mean of steps 1-10) 5.5000 -> (mean of steps 291-300) 295.5000"
    )
    assert pretrain.loss_summary({7: 2.0}) == "training loss (step 7) 2.0000"
    assert (
        pretrain.loss_summary({1: 1.0, 2: 3.0})
        == "training loss (step 1) 1.0000 -> (step 2) 3.0000"
    )


def test_rerunning_a_complete_run_says_so_at_once(run_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(run_dir, tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()

    def never(*a, **k):
        raise AssertionError("a complete run must not build data, train or sample")

    for name in ("build_data", "train", "generate"):
        monkeypatch.setattr(pretrain, name, never)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert main(_relative_args("run", 8, tmp_path)) == 0
    assert time.perf_counter() - start < 10
    assert capsys.readouterr().out.strip() == (
        "run is complete at step 8 (loop.steps=8); raise --steps to train further, or use a new --out"
    )
    assert main(_relative_args("run", 6, tmp_path)) == 0
    assert "run is at step 8, past loop.steps=6;" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


def _eval(capsys, *argv) -> tuple[float, int, str]:
    assert main(["eval", *argv]) == 0
    out = capsys.readouterr().out
    m = re.search(r"loss ([\d.]+) perplexity [\d.]+ over (\d+) sequences of 64 tokens", out)
    assert m, out
    return float(m.group(1)), int(m.group(2)), out


def test_eval_without_data_is_the_runs_own_heldout_loss(run_dir, tmp_path, monkeypatch, capsys):
    """The training loop's last evaluation (batch 4, 8 batches) is what eval repeats by default,
    from any working directory; the held-out text written out and given as --data agrees."""
    monkeypatch.chdir(tmp_path)
    meta = read_meta(run_dir / "checkpoints" / "8")
    loss, count, out = _eval(
        capsys, "--ckpt", str(run_dir), "--batch-size", "4", "--max-batches", "8"
    )
    assert "from the run's held-out split" in out and count == 32
    assert loss == pytest.approx(meta["eval_loss"], abs=1e-4)

    (_, heldout), _ = load_documents(DataConfig(
        **{**meta["config"]["data"], "paths": tuple(meta["config"]["data"]["paths"]),
           "tokenizer_config": TokenizerConfig(**meta["config"]["data"]["tokenizer_config"])}
    ))  # fmt: skip
    files = []
    for i, doc in enumerate(heldout):  # names that sort in the split's order
        files.append(tmp_path / f"{i:05d}.txt")
        files[-1].write_text(doc.text, encoding="utf-8", newline="")
    with_data, _, _ = _eval(
        capsys, "--ckpt", str(run_dir), "--batch-size", "4", "--max-batches", "8",
        "--data", *map(str, files),
    )  # fmt: skip
    assert with_data == pytest.approx(loss, abs=1e-4)


def test_eval_counts_the_sequences_it_evaluated(run_dir, capsys):
    run = load_run(str(run_dir))
    rows = len(heldout_rows(run.meta, run.tokenizer, 64))
    for batch, batches in [(3, 2), (7, 1000), (rows + 5, 1)]:
        _, count, _ = _eval(
            capsys,
            "--ckpt",
            str(run_dir),
            "--batch-size",
            str(batch),
            "--max-batches",
            str(batches),
        )
        per = min(batch, rows)  # one batch of everything when the batch is larger than the split
        assert count == min(rows // per, batches) * per, (batch, batches, rows)


def test_tiny_shakespeare_needs_its_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "TINY_SHAKESPEARE", tmp_path / "absent" / "tinyshakespeare.txt")
    code = main(["pretrain", "--recipe", "tiny-shakespeare", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [
        "llmjax pretrain: error: the tiny-shakespeare recipe needs the text: download "
        "tinyshakespeare.txt and pass --data PATH"
    ]
    text = tmp_path / "shakespeare.txt"
    text.write_text("To be, or not to be.\n")
    args = parser().parse_args(["pretrain", "--recipe", "tiny-shakespeare", "--data", str(text)])
    cfg = build_pretrain_config(args)
    pretrain.check_data(cfg)  # given --data, nothing is missing
    assert cfg.data.paths == (str(text),) and cfg.name == "tiny-shakespeare"
