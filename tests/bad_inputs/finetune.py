"""Bad-input rows for ``llmjax sft``: the base, the records, LoRA and quantization settings.

Each fails before any training step runs; the base is the shared pretraining run."""

from __future__ import annotations

import json

from tests.bad_inputs import Cli, Env


def _records(env: Env, extra: list[str] = ()) -> str:
    good = [
        json.dumps({"prompt": f"what is {i} plus {i}", "completion": f" {2 * i}"})
        for i in range(40)
    ]
    return env.write("sums.jsonl", "\n".join([*good, *extra]) + "\n")


def _sft(env: Env, *extra: str, base=None, data=None) -> list[str]:
    base = str(env.run) if base is None else base
    data = _records(env) if data is None else data
    out = str(env.tmp / "out")
    return [
        "sft",
        "--base",
        base,
        "--data",
        data,
        "--out",
        out,
        "--steps",
        "1",
        "--seq-len",
        "32",
        *extra,
    ]


CASES = [
    Cli(
        "sft base missing",
        lambda e: _sft(e, base=str(e.tmp / "nowhere")),
        "no such file or directory",
    ),
    Cli(
        "sft base neither run nor hf",
        lambda e: _sft(e, base=str(e.write("plain/notes.txt", "x").rsplit("/", 1)[0])),
        "neither a llmjax run",
    ),
    Cli(
        "sft data not jsonl",
        lambda e: _sft(e, data=e.write("d.txt", "hello\n")),
        "is not a .jsonl file",
    ),
    Cli("sft data missing", lambda e: _sft(e, data=str(e.tmp / "none.jsonl")), "no such file"),
    Cli(
        "sft quantized base without lora",
        lambda e: _sft(e, "--quantize-base", "nf4"),
        "a quantized base trains only with LoRA adapters",
    ),
    Cli("sft lora alpha without rank", lambda e: _sft(e, "--lora-alpha", "16"), "need --lora-rank"),
    Cli(
        "sft lora rank zero",
        lambda e: _sft(e, "--lora-rank", "0"),
        "rank=0: must be a positive int",
    ),
    Cli(
        "sft lora dropout one",
        lambda e: _sft(e, "--lora-rank", "4", "--lora-dropout", "1"),
        "must be in [0, 1)",
    ),
    Cli(
        "sft lora targets not a regex",
        lambda e: _sft(e, "--lora-rank", "4", "--lora-targets", "layers.(0"),
        "not a valid regex",
    ),
    Cli(
        "sft lora targets match nothing",
        lambda e: _sft(e, "--lora-rank", "4", "--lora-targets", r"decoder\.q_proj"),
        "decoder",
    ),
    Cli(
        "sft trainable with lora",
        lambda e: _sft(e, "--lora-rank", "4", "--set", "trainable=layers.*"),
        "--lora-targets",
    ),
    Cli(
        "sft trainable matches nothing",
        lambda e: _sft(e, "--set", r"trainable=decoder\..*"),
        "matches no parameter",
    ),
    Cli("sft seq_len beyond the base", lambda e: _sft(e, "--seq-len", "100000"), "max_seq_len"),
    Cli(
        "sft strict bad record",
        lambda e: _sft(e, "--strict", data=_records(e, ['{"prompt": "x", "completion": 3}'])),
        "sums.jsonl:41:",
    ),
    Cli(
        "sft mixed formats",
        lambda e: _sft(e, data=_records(e, ['{"text": "just text"}'])),
        "sums.jsonl:41:",
    ),
    Cli(
        "sft no usable record",
        lambda e: _sft(e, data=e.write("bad.jsonl", '{"prompt": "x"}\n' * 5)),
        "no usable record",
    ),
]
