"""Bad input of every kind, as a table: one clear line and exit code 2 from the command line, a
typed exception from Python, and nothing lost (see tests/cases.py for what a row checks)."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import jax
import pytest

import llmjax
from llmjax.cli import main
from llmjax.errors import LlmjaxError
from tests.cases import Api, Cli, Env
from tests.train.helpers import REPO, cli_args, corpus_paths


def _pretrain(env: Env, *extra: str) -> list[str]:
    return cli_args(env.tmp / "out", steps=2, extra=extra)


def _with_data(env: Env, *paths: str) -> list[str]:
    base = _pretrain(env)
    at = base.index("--data") + 1
    return [*base[:at], *paths, *base[at + len(env.corpus) :]]


CASES = [
    Cli(
        "empty corpus",
        lambda e: _with_data(e, e.write("empty.txt", "\n \n")),
        "corpus is empty",
    ),
    Cli("missing data file", lambda e: _with_data(e, str(e.tmp / "missing.txt")), "no such file"),
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
]

# Each area keeps its rows in its own module while it grows; they all run here.
for _name in ("cases_data", "cases_interop", "cases_inference", "cases_cli", "cases_checkpoint"):
    try:
        CASES += importlib.import_module(f"tests.{_name}").CASES
    except ModuleNotFoundError as _e:
        if _e.name != f"tests.{_name}":
            raise


@pytest.fixture(scope="module")
def shared(trained_run, exported_hf) -> Env:
    model = llmjax.build("llama3-tiny")
    params = jax.jit(model.init)(jax.random.key(0))
    return Env(trained_run, exported_hf, model, params, corpus_paths())


def _error_lines(err: str) -> list[str]:
    """stderr without argparse's usage block (``usage:`` and its indented continuation)."""
    lines, in_usage = [], False
    for ln in err.splitlines():
        if ln.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and ln.startswith(" "):
            continue
        in_usage = False
        if ln.strip():
            lines.append(ln)
    return lines


def test_the_table_is_large_and_its_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(CASES) >= 60, len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, shared, tmp_path, capsys):
    env = dataclasses.replace(shared, tmp=tmp_path)
    if isinstance(case, Cli):
        code = main(case.argv(env))
        err = capsys.readouterr().err
        lines = _error_lines(err)
        assert "Traceback" not in err, err
        assert code == 2, f"exit {code}\n{err}"
        assert len(lines) == 1 and "error:" in lines[0], err
        assert case.expect in lines[0], err
    else:
        assert isinstance(case, Api)
        assert issubclass(case.error, LlmjaxError), "Python errors must be typed llmjax errors"
        with pytest.raises(case.error) as info:
            case.call(env)
        assert case.expect in str(info.value)
    if case.after is not None:
        case.after(env)


def test_a_real_process_prints_one_line_from_another_directory(tmp_path):
    """As typed in a shell: relative paths from another working directory, exit 2, one line."""
    (tmp_path / "notes.bin").write_bytes(bytes(range(256)) * 64)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        (["eval", "--ckpt", "no/such/run"], "no/such/run"),
        (["generate", "--ckpt", "no/such/run", "--prompt", "x"], "no/such/run"),
        (["pretrain", "--data", "notes.bin", "--out", "out", "--steps", "1"], "notes.bin"),
    ]
    for argv, expect in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "llmjax.cli", *argv],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = _error_lines(proc.stderr)
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and expect in lines[0], proc.stderr
