"""`llmjax pretrain` as a two-process job on localhost equals the one-process run."""

import os
import socket
import subprocess
import sys

import numpy as np

from llmjax.checkpoint import step_dirs
from llmjax.train.metrics import read_metrics
from tests.train.helpers import REPO, cli_args

STEPS = 9


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


def _launch(out, env_extra, devices, extra=()):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **env_extra,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    cmd = [sys.executable, "-m", "llmjax.cli", *cli_args(out, STEPS, extra=extra)]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_process_pretrain_matches_one_process(tmp_path):
    single = _launch(tmp_path / "single", {}, devices=1)
    log, _ = single.communicate(timeout=600)
    assert single.returncode == 0, log
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "multi"
    procs = [
        _launch(
            out,
            {
                "LLMJAX_COORDINATOR": f"127.0.0.1:{port}",
                "LLMJAX_NUM_PROCESSES": "2",
                "LLMJAX_PROCESS_ID": str(i),
            },
            devices=2,
            extra=("--mesh", "data=2,fsdp=2"),
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    # Process 0 speaks for the job: its log has the recipe line, process 1's does not.
    assert "recipe" in logs[0] and "recipe" not in logs[1]
    ref, got = _losses(tmp_path / "single"), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=1e-4
    )
    assert max(step_dirs(out / "checkpoints")) == STEPS
