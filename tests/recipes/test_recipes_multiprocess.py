"""Post-training commands as two-process jobs on localhost equal the one-process runs: `llmjax dpo`
(the reference log-probs computed once before training, each process scoring its rows of every
batch, then gathering) and `llmjax grpo` (rollouts sampled on the global mesh, decoded and scored
on every process)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from llmjax.recipes.pairs import REFERENCE_FILE
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_pairs, write_prompts
from tests.train.helpers import REPO


def _launch(args, env_extra, devices):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        **env_extra,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    cmd = [sys.executable, "-m", "llmjax.cli", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _single_and_multi(tmp_path, args):
    """Runs ``args(out, *extra)`` as one process and as two; returns both output directories."""
    single = _launch(args(tmp_path / "single"), {}, devices=1)
    log, _ = single.communicate(timeout=600)
    assert single.returncode == 0, log
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "multi"
    procs = [
        _launch(
            args(out, "--set", "loop.mesh=data=2,fsdp=2"),
            {
                "LLMJAX_COORDINATOR": f"127.0.0.1:{port}",
                "LLMJAX_NUM_PROCESSES": "2",
                "LLMJAX_PROCESS_ID": str(i),
            },
            devices=2,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return tmp_path / "single", out


def _losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


@pytest.mark.slow
def test_two_process_dpo_matches_one_process(tmp_path):
    base = make_base(tmp_path / "base")
    pairs = write_pairs(tmp_path / "pairs.jsonl")

    def args(out, *extra):
        common = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2"]
        common += ["--set", "loop.log_every=1", *extra]
        return ["dpo", "--base", str(base), "--data", str(pairs), "--out", str(out), *common]

    single, out = _single_and_multi(tmp_path, args)
    with np.load(single / REFERENCE_FILE) as a, np.load(out / REFERENCE_FILE) as b:
        np.testing.assert_allclose(a["train"], b["train"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["heldout"], b["heldout"], rtol=1e-5, atol=1e-5)
    ref, got = _losses(single), _losses(out)
    assert sorted(got) == [1, 2, 3]
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4)


@pytest.mark.slow
def test_two_process_grpo_matches_one_process(tmp_path):
    base = make_base(tmp_path / "base")
    files = write_prompts(tmp_path)

    def args(out, *extra):
        common = ["--steps", "2", "--batch-size", "4", "--num-generations", "2"]
        common += ["--max-new-tokens", "4", "--lr", "1e-2", "--set", "loop.log_every=1"]
        common += ["--reward", f"{files / 'rewards.py'}:short_digits", *extra]
        data = str(files / "prompts.jsonl")
        return ["grpo", "--base", str(base), "--data", data, "--out", str(out), *common]

    single, out = _single_and_multi(tmp_path, args)
    rewards = [
        {r["step"]: r["reward"] for r in read_metrics(d) if "reward" in r} for d in (single, out)
    ]
    assert rewards[0] == pytest.approx(rewards[1], rel=1e-5)
    ref, got = _losses(single), _losses(out)
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-4, atol=1e-6)
