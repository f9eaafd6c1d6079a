"""Kill / resume: a resumed run reproduces the uninterrupted run's per-step losses bit for bit."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llmjax.checkpoint import step_dirs
from llmjax.train.metrics import read_metrics
from tests.train.helpers import REPO, cli_args

STEPS = 80


def losses(out):
    return {
        r["step"]: (r["loss"], r["grad_norm"], r["learning_rate"])
        for r in read_metrics(out)
        if "loss" in r
    }


def launch(out, steps=STEPS, devices=None, extra=()):
    """``llmjax pretrain`` as a user types it: from the run's parent directory, every path
    relative (``--out run``, ``--data ../../...``)."""
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO)
    args = cli_args(out.name, steps, extra=("--save-every", "5", *extra))
    args = [os.path.relpath(a, out.parent) if os.path.isabs(a) else a for a in args]
    cmd = [sys.executable, "-m", "llmjax.cli", *args]
    return subprocess.Popen(
        cmd, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_until(out, min_step, sig, **launch_args):
    """Start a run, wait until it has logged ``min_step``, send ``sig``; return its exit code."""
    proc = launch(out, **launch_args)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and max(losses(out), default=0) >= min_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    code, log = finish(proc)
    return code, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    code, log = finish(launch(out))
    assert code == 0, log
    ref = losses(out)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return out, ref


def test_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "run"
    # Reuse the reference's tokenizer and token cache: only the training state is under test.
    shutil.copytree(ref_out / "tokenizer", out / "tokenizer")
    shutil.copytree(ref_out / "cache", out / "cache")
    code, log = run_until(out, 12, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the run ended before it could be killed:\n{log}"
    killed_at = max(losses(out))
    assert killed_at < STEPS
    code, log = finish(launch(out))
    assert code == 0, log
    resumed = int(log.split("(step ")[1].split(")")[0])
    assert 0 < resumed <= killed_at and resumed % 5 == 0, log
    assert "absl" not in log and "invalid" not in log, log  # quiet, and nothing set aside
    assert losses(out) == ref  # every step, including those after the resume, exactly equal


def test_sigterm_saves_and_resumes_identically(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out / "tokenizer", out / "tokenizer")
    code, log = run_until(out, 7, signal.SIGTERM)
    assert code == 143, log
    stopped = max(losses(out))
    assert stopped < STEPS and step_dirs(out / "checkpoints")[0] == stopped  # saved on the spot
    code, log = finish(launch(out))
    assert code == 0, log
    assert f"(step {stopped})" in log
    assert losses(out) == ref


def test_resume_on_another_device_count(reference, tmp_path):
    """Stopped while sharded over 2 devices (fsdp), resumed on 1: the run continues."""
    _, ref = reference
    out = tmp_path / "run"
    code, log = run_until(out, 10, signal.SIGTERM, devices=2, extra=("--mesh", "fsdp=2"))
    assert code == 143, log
    stopped = max(losses(out))
    assert "fsdp" in (out / "checkpoints" / str(stopped) / "meta" / "metadata").read_text()
    code, log = finish(launch(out, devices=1))
    assert code == 0, log
    assert f"(step {stopped})" in log
    got = losses(out)
    assert sorted(got) == sorted(ref)
    # Another device count sums in another order: equal to rounding, not bitwise.
    for s in ref:
        np.testing.assert_allclose(got[s][0], ref[s][0], rtol=1e-3, err_msg=f"step {s}")
