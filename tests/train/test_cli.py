"""The command line end to end on a small run, and one clear error per bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.checkpoint.load import load_run
from llmjax.cli import main
from llmjax.data import Tokenizer
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
