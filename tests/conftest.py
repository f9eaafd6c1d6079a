"""Process-wide settings that must be in place before jax creates its CPU backend."""

import os

# The Mosaic GPU kernels run on CPU in jax's GPU interpreter (tests/kernels/mgpu_interpret.py),
# one XLA computation per warpgroup, each blocking on the others' barriers. Three warpgroups and
# the kernel's own call can hold XLA's CPU thread pool at once; a pool sized to a 2-core machine
# leaves a warpgroup unscheduled and the kernel waits forever. XLA sizes the pool from NPROC.
os.environ.setdefault("NPROC", str(max(4, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished 8-step ``llmjax pretrain`` run (checkpoints 3, 4, 6, 8); tests must not modify it."""
    from llmjax.cli import main
    from tests.train.helpers import cli_args

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(cli_args(out, steps=8, extra=["--set", "loop.eval_every=4"])) == 0
    return out


@pytest.fixture(scope="session")
def exported_hf(trained_run, tmp_path_factory):
    """``trained_run`` written by ``llmjax export``: a Hugging Face directory with tokenizer.model."""
    from llmjax.cli import main

    out = tmp_path_factory.mktemp("exported") / "hf"
    assert main(["export", "--ckpt", str(trained_run), "--out", str(out)]) == 0
    return out
