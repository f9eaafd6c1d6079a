"""A small real corpus and a small real config, shared by the training tests."""

from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import llmjax
from llmjax.data import DataConfig, TokenizerConfig
from llmjax.train import LoopConfig, OptimizerConfig, TrainConfig

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def corpus_paths() -> tuple[str, ...]:
    """tinyshakespeare beside the repository, else a slice of the standard library's sources."""
    if SHAKESPEARE.is_file():
        return (str(SHAKESPEARE),)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return tuple(str(p) for p in sorted(stdlib.glob("*.py"))[:60])


def small_config(steps=12, seq_len=64, batch_size=4, **loop) -> TrainConfig:
    model = llmjax.presets.get("llama3-tiny")
    loop = {
        "log_every": 1,
        "eval_every": 0,
        "save_every": 3,
        "sample_tokens": 0,
        "progress": False,
        **loop,
    }
    return TrainConfig(
        name="test",
        model=model,
        data=DataConfig(
            paths=corpus_paths(),
            seq_len=seq_len,
            batch_size=batch_size,
            tokenizer_config=TokenizerConfig(512, max_lines=20_000),
        ),
        optim=OptimizerConfig(lr=3e-3, warmup_steps=3),
        loop=LoopConfig(steps=steps, **loop),
    )


def cli_args(out, steps=12, extra=()) -> list[str]:
    """``llmjax pretrain`` arguments equivalent to ``small_config``."""
    return [
        "pretrain",
        "--preset",
        "llama3-tiny",
        "--data",
        *corpus_paths(),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--save-every",
        "3",
        "--log-every",
        "1",
        "--set",
        "loop.eval_every=0",
        "--set",
        "loop.sample_tokens=0",
        "--set",
        "data.tokenizer_config.vocab_size=512",
        "--set",
        "data.tokenizer_config.max_lines=20000",
        "--set",
        "optim.warmup_steps=3",
        *extra,
    ]


def replace(cfg, **sections):
    return dataclasses.replace(cfg, **sections)
