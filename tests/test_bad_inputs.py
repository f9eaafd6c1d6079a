"""Bad input of every kind, as a table: one clear line and exit code 2 from the command line, a
typed exception from Python, and nothing lost (tests/bad_inputs/ holds the rows, by area)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

import llmjax
from llmjax.cli import main
from llmjax.errors import LlmjaxError
from tests.bad_inputs import (
    Api,
    Cli,
    Env,
    cli,
    data,
    distill,
    finetune,
    inference,
    interop,
    preference,
    rl,
)
from tests.train.helpers import REPO, corpus_paths

CASES = (
    cli.CASES
    + data.CASES
    + finetune.CASES
    + distill.CASES
    + preference.CASES
    + rl.CASES
    + interop.CASES
    + inference.CASES
)


@pytest.fixture(scope="module")
def shared(trained_run, exported_hf) -> Env:
    model = llmjax.build("llama3-tiny")
    params = jax.jit(model.init)(jax.random.key(0))
    return Env(trained_run, exported_hf, model, params, corpus_paths())


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


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
