"""The main job: ``llmjax pretrain`` with no flags, end to end on the standard library."""

import math
import re

import pytest

from llmjax.cli import main
from llmjax.train.metrics import read_metrics


@pytest.mark.slow
def test_default_pretrain_runs_end_to_end(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"held-out loss [\d.]+, perplexity ([\d.]+)", out).group(1))
    assert "sample:\n" in out and len(out.split("sample:\n")[1].strip()) > 20
    recs = read_metrics(tmp_path)
    train = [r["loss"] for r in recs if "loss" in r]
    assert train[-1] < train[0] - 2.0  # clearly falling: ~6.9 -> ~3.6 nats
    assert ppl < math.exp(train[0] - 2.0)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [100, 200, 300]
