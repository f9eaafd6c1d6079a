"""bench/decode.py runs end to end: llmjax and transformers decode the same weights to the same
greedy tokens (a whole-sampler check against ``transformers.generate``), and the report is sane."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "decode.py"


def test_decode_bench_greedy_equal_to_transformers(capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--sizes", "stdlib", "--batch", "1,3", "--new", "6", "--prompt-len", "9"]
    assert bench.main([*argv, "--reps", "1", "--torch-threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = report["results"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["greedy_equal"] and r["first_difference"] is None
        for key in ("llmjax_decode_tok_s", "hf_decode_tok_s", "matmul_floor_tok_s"):
            assert r[key] > 0
        # stdlib, float32: 4 layers of q, k, v, o (2 of 4 heads' width for k and v) and 3 MLP
        # matrices, plus the lm_head; the ceiling is batch x streaming rate / those bytes.
        d, mlp, vocab = 128, 384, 1024
        assert r["weight_bytes"] == 4 * (4 * (3 * d * d + 3 * d * mlp) + d * vocab)
        ceiling = r["batch"] * r["stream_gb_s"] * 1e9 / r["weight_bytes"]
        assert r["bandwidth_ceiling_tok_s"] == pytest.approx(ceiling)
        assert 1 < r["stream_gb_s"] < 10_000
