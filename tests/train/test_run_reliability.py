"""A run directory as users meet it: relative paths from another working directory, a damaged
newest checkpoint, a torn metrics file, two runs on one directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmjax.checkpoint import step_dirs
from llmjax.cli import main
from llmjax.train.metrics import read_metrics
from tests.train.helpers import REPO, cli_args, corpus_paths
from tests.train.test_checkpoint_damage import _data_file, on_small_tmpfs


@pytest.fixture
def run_copy(trained_run, tmp_path, monkeypatch):
    """A private copy of the shared 8-step run, with the working directory at its parent."""
    shutil.copytree(trained_run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "run"


def test_eval_generate_export_with_relative_paths(run_copy, capsys):
    data = os.path.relpath(corpus_paths()[0])
    assert main(["eval", "--ckpt", "run", "--data", data, "--max-batches", "1"]) == 0
    assert "run/checkpoints/8" in capsys.readouterr().out
    assert main(["generate", "--ckpt", "run", "--prompt", "To ", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("To ")
    assert main(["export", "--ckpt", "run/checkpoints", "--out", "hf"]) == 0
    assert (run_copy.parent / "hf" / "model.safetensors").is_file()


def test_a_damaged_newest_step_is_skipped_in_one_line_and_kept(run_copy, capsys):
    # Every data file of step 8 loses its second half: the parameters cannot be read (a flip in
    # one file might hit only the optimizer state, which eval rightly never reads).
    for f in (run_copy / "checkpoints" / "8" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    data = os.path.relpath(corpus_paths()[0])
    assert main(["eval", "--ckpt", "run", "--data", data, "--max-batches", "1"]) == 0
    captured = capsys.readouterr()
    notes = [ln for ln in captured.err.splitlines() if "damaged" in ln or "checksum" in ln]
    assert len(notes) == 1 and "using step 6" in notes[0], captured.err
    assert "run/checkpoints/6" in captured.out
    assert step_dirs(run_copy / "checkpoints")[0] == 8  # reading never moves a checkpoint
    # An explicit step directory is used or refused, never replaced by another step.
    assert main(["generate", "--ckpt", "run/checkpoints/8", "--prompt-ids", "2,5"]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_resume_sets_a_damaged_step_aside_and_ignores_a_torn_metrics_line(run_copy, capsys):
    """The run had finished at step 8, whose data file is then truncated: the run is not
    "complete", it resumes from step 6 and trains steps 7-8 again."""
    data = _data_file(run_copy / "checkpoints" / "8")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with open(run_copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 3.1, "learn')  # killed mid-write
    assert main(cli_args("run", steps=8)) == 0
    captured = capsys.readouterr()
    assert "resumed from run/checkpoints/6 (step 6)" in captured.out
    assert [ln for ln in captured.err.splitlines() if "damaged" in ln][0].endswith(
        "resuming from step 6"
    )
    assert [p.name[:10] for p in (run_copy / "checkpoints").glob("8.invalid-*")] == ["8.invalid-"]
    steps = [r["step"] for r in read_metrics(run_copy) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one record per step, none torn
    for line in (run_copy / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


HOLD = """
import sys, time
from llmjax.train import rundir
with rundir.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_one_directory_is_refused_until_the_first_dies(run_copy, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, "run"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(cli_args("run", steps=10)) == 2
        err = capsys.readouterr().err.strip()
        assert f"run is in use by another llmjax run (pid {holder.pid} on" in err
        assert len(err.splitlines()) == 1, err
        assert step_dirs(run_copy / "checkpoints")[0] == 8
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    # The kernel released the killed holder's lock: the run resumes and finishes.
    assert main(cli_args("run", steps=9)) == 0
    assert step_dirs(run_copy / "checkpoints")[0] == 9


@pytest.mark.slow  # test_checkpoint_damage fills a real disk in the default run, in-process
def test_pretrain_on_a_full_disk_stops_with_one_line_and_keeps_its_checkpoint(tmp_path):
    """``--out`` on a 4 MiB tmpfs (in a private mount namespace): the token cache and the first
    checkpoint fit, the second does not."""
    cli = f"{sys.executable} -m llmjax.cli"
    pretrain = " ".join(cli_args("MNT/run", steps=4, extra=["--save-every", "1"]))
    proc = on_small_tmpfs(
        tmp_path,
        "4m",
        f"{cli} {pretrain} 2>{tmp_path}/err; echo PRETRAIN $?; "
        f"{cli} generate --ckpt MNT/run --prompt-ids 2,40 --max-new-tokens 2; echo GENERATE $?; "
        "ls MNT/run/checkpoints",
        timeout=600,
    )
    err = (tmp_path / "err").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]
    assert "PRETRAIN 2" in proc.stdout, proc.stdout + err
    assert len(lines) == 1 and "error: no space left on the device of" in lines[0], err
    assert "bytes) and" in lines[0] and "steps 1 are intact" in lines[0], err
    assert "GENERATE 0" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.split("GENERATE 0")[1].split() == ["1"]  # nothing half-written beside it
