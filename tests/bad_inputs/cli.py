"""Bad-input rows for the command line itself: flags, overrides, eval, plan, plot, tokenizer.

Every row fails before any training step runs (see tests/bad_inputs/__init__.py for what a row checks).
"""

from __future__ import annotations

from tests.bad_inputs import Cli, Env
from tests.train.helpers import cli_args


def _pretrain(env: Env, *extra: str) -> list[str]:
    return cli_args(env.tmp / "out", steps=2, extra=extra)


def _eval(env: Env, *extra: str) -> list[str]:
    return ["eval", "--ckpt", str(env.run), *extra]


def _plan(*extra: str) -> list[str]:
    return ["plan", "--preset", "llama3-tiny", "--batch", "8", "--seq-len", "64", *extra]


def _tokenizer(env: Env, *extra: str) -> list[str]:
    return ["tokenizer", "train", "--data", *env.corpus, "--out", str(env.tmp / "t.model"), *extra]


CASES = [
    Cli(
        "seq_len beyond the model",
        lambda e: _pretrain(e, "--seq-len", "512"),
        "beyond the model's max_seq_len=256",
    ),
    Cli(
        "unknown preset",
        lambda e: _pretrain(e, "--preset", "llama9-huge"),
        "unknown preset 'llama9-huge'",
    ),
    Cli("bad value", lambda e: _pretrain(e, "--set", "loop.steps=many"), "expected int"),
    Cli("unknown recipe", lambda e: ["pretrain", "--recipe", "nope"], "unknown recipe 'nope'"),
    Cli("bad mesh", lambda e: _pretrain(e, "--mesh", "pipeline=2"), "unknown axis 'pipeline'"),
    # --- pretrain: flags and overrides ---
    Cli(
        "set: unknown key suggests the closest",
        lambda e: _pretrain(e, "--set", "optim.learning_rate=1e-3"),
        "unknown config key 'optim.learning_rate'; did you mean optim.lr?",
    ),
    Cli(
        "set: a field without its section",
        lambda e: _pretrain(e, "--set", "steps=5"),
        "did you mean loop.steps?",
    ),
    Cli(
        "set: no equals sign",
        lambda e: _pretrain(e, "--set", "loop.steps"),
        "--set 'loop.steps' has no '=': write --set loop.steps=VALUE",
    ),
    Cli(
        "set: a section, not a field",
        lambda e: _pretrain(e, "--set", "optim=1"),
        "'optim' is a section, not a field",
    ),
    Cli(
        "recipe: near miss",
        lambda e: ["pretrain", "--recipe", "tiny_shakespeare"],
        "did you mean tiny-shakespeare?",
    ),
    Cli("steps zero", lambda e: _pretrain(e, "--steps", "0"), "loop.steps=0: must be >= 1"),
    Cli("steps not a number", lambda e: _pretrain(e, "--steps", "ten"), "invalid int value"),
    Cli(
        "batch size zero",
        lambda e: _pretrain(e, "--batch-size", "0"),
        "data.batch_size=0: must be positive",
    ),
    Cli(
        "missing tokenizer file",
        lambda e: _pretrain(e, "--tokenizer", str(e.tmp / "none.model")),
        "none.model': no such file",
    ),
    Cli("no command", lambda e: [], "the following arguments are required: COMMAND"),
    Cli("unknown command", lambda e: ["train"], "invalid choice: 'train'"),
    # --- eval ---
    Cli(
        "eval: batch size zero",
        lambda e: _eval(e, "--batch-size", "0"),
        "argument --batch-size: must be at least 1, got 0",
    ),
    Cli(
        "eval: negative batch size",
        lambda e: _eval(e, "--batch-size", "-4"),
        "argument --batch-size: must be at least 1, got -4",
    ),
    Cli(
        "eval: max batches zero",
        lambda e: _eval(e, "--max-batches", "0"),
        "argument --max-batches: must be at least 1, got 0",
    ),
    Cli(
        "eval: batch size not a number",
        lambda e: _eval(e, "--batch-size", "eight"),
        "expected a whole number, got 'eight'",
    ),
    Cli(
        "eval: seq-len beyond the model",
        lambda e: _eval(e, "--seq-len", "512"),
        "--seq-len 512 is beyond the model's max_seq_len=256",
    ),
    Cli("eval: seq-len of one", lambda e: _eval(e, "--seq-len", "1"), "must be at least 2"),
    Cli(
        "eval: missing data",
        lambda e: _eval(e, "--data", str(e.tmp / "gone.txt")),
        "no such file",
    ),
    Cli(
        "eval: missing run",
        lambda e: ["eval", "--ckpt", str(e.tmp / "no-run")],
        "no-run",
    ),
    Cli(
        "export: missing run",
        lambda e: ["export", "--ckpt", str(e.tmp / "no-run"), "--out", str(e.tmp / "hf")],
        "no-run",
    ),
    Cli("export: no --out", lambda e: ["export", "--ckpt", str(e.run)], "required: --out"),
    # --- plot ---
    Cli(
        "plot: a directory without metrics",
        lambda e: ["plot", str(e.tmp)],
        "metrics.jsonl does not exist",
    ),
    # --- tokenizer train ---
    Cli(
        "tokenizer: vocabulary too small",
        lambda e: _tokenizer(e, "--vocab-size", "10"),
        "vocab_size=10: must be at least 300",
    ),
    Cli(
        "tokenizer: max lines zero",
        lambda e: _tokenizer(e, "--max-lines", "0"),
        "argument --max-lines: must be at least 1, got 0",
    ),
    Cli(
        "tokenizer: unknown model type",
        lambda e: _tokenizer(e, "--model-type", "wordpiece"),
        "invalid choice: 'wordpiece'",
    ),
    # --- plan ---
    Cli(
        "plan: unknown preset",
        lambda e: ["plan", "--preset", "llama9", "--batch", "8", "--seq-len", "64"],
        "unknown preset 'llama9'",
    ),
    Cli(
        "plan: no preset",
        lambda e: ["plan", "--batch", "8", "--seq-len", "64"],
        "the following arguments are required: --preset",
    ),
    Cli(
        "plan: batch the mesh does not divide",
        lambda e: _plan("--mesh", "fsdp=3"),
        "batch size 8 is not divisible by data x fsdp x expert = 3",
    ),
    Cli(
        "plan: mesh axis of -1",
        lambda e: _plan("--mesh", "fsdp=-1"),
        "the planner needs every mesh axis size; fsdp is -1",
    ),
    Cli(
        "plan: mesh axis of 0",
        lambda e: _plan("--mesh", "fsdp=0"),
        "mesh axis sizes must be at least 1: fsdp=0",
    ),
    Cli("plan: unknown axis", lambda e: _plan("--mesh", "pipe=2"), "unknown axis 'pipe'"),
    Cli("plan: mesh without sizes", lambda e: _plan("--mesh", "fsdp"), "'fsdp' is not axis=size"),
    Cli(
        "plan: unknown rules",
        lambda e: _plan("--rules", "zero3"),
        "unknown parallelism preset 'zero3'",
    ),
    Cli("plan: zero memory", lambda e: _plan("--hbm", "0"), "device memory must be positive"),
    Cli(
        "plan: batch zero",
        lambda e: ["plan", "--preset", "llama3-tiny", "--batch", "0", "--seq-len", "64"],
        "argument --batch: must be at least 1, got 0",
    ),
    Cli("plan: unknown dtype", lambda e: _plan("--dtype", "fp8"), "invalid choice: 'fp8'"),
    Cli(
        "export: into the run's own directory",
        lambda e: ["export", "--ckpt", str(e.copy(e.run, "run")), "--out", str(e.tmp / "run")],
        "is the run's own directory",
        after=lambda e: _nothing_exported(e.tmp / "run"),
    ),
    Cli(
        "tokenizer train: more pieces than the text yields",
        lambda e: [
            "tokenizer",
            "train",
            "--data",
            e.write("small.txt", "a few words\n" * 50),
            "--vocab-size",
            "512",
            "--out",
            str(e.tmp / "t.model"),
        ],
        "fewer than --vocab-size=512; add data",
        after=lambda e: _not_written(e.tmp / "t.model"),
    ),
]


def _nothing_exported(run) -> None:
    assert not (run / "config.json").exists() and not list(run.glob("*.safetensors"))


def _not_written(path) -> None:
    assert not path.exists()
