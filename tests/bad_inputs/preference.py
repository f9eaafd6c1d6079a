"""Bad-input rows for ``llmjax dpo`` and ``llmjax reward``: the base, the pairs, the loss settings
and what they combine with. Each fails before any training step runs; the base is the shared
pretraining run."""

from __future__ import annotations

import json

from tests.bad_inputs import Cli, Env


def _pairs(env: Env, rows: list[dict] | None = None, extra: list[str] = ()) -> str:
    if rows is None:
        rows = [
            {"prompt": f"what is {i} plus {i}", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
            for i in range(40)
        ]
    return env.write("pairs.jsonl", "\n".join([*map(json.dumps, rows), *extra]) + "\n")


def _cmd(command: str, env: Env, *extra: str, base=None, data=None) -> list[str]:
    base = str(env.run) if base is None else base
    data = _pairs(env) if data is None else data
    out = str(env.tmp / "out")
    args = [command, "--base", base, "--data", data, "--out", out, "--steps", "1"]
    return [*args, "--seq-len", "32", *extra]


def _dpo(env: Env, *extra: str, **kw) -> list[str]:
    return _cmd("dpo", env, *extra, **kw)


def _identical(env: Env) -> str:
    rows = [{"prompt": f"{i} plus {i}", "chosen": f" {i}", "rejected": f" {i}"} for i in range(9)]
    return _pairs(env, rows)


CASES = [
    Cli("dpo base missing", lambda e: _dpo(e, base=str(e.tmp / "nowhere")), "no such file"),
    Cli("dpo data missing", lambda e: _dpo(e, data=str(e.tmp / "none.jsonl")), "no such file"),
    Cli(
        "dpo sft records instead of pairs",
        lambda e: _dpo(e, data=e.write("sft.jsonl", '{"prompt": "a", "completion": " b"}\n' * 9)),
        "chosen",
    ),
    Cli("dpo only identical pairs", lambda e: _dpo(e, data=_identical(e)), "identical"),
    Cli(
        "dpo identical pair in strict mode",
        lambda e: _dpo(
            e,
            "--strict",
            data=_pairs(e, extra=['{"prompt": "x", "chosen": " y", "rejected": " y"}']),
        ),
        "identical",
    ),
    Cli(
        "dpo label smoothing with hinge",
        lambda e: _dpo(e, "--loss", "hinge", "--label-smoothing", "0.1"),
        "label_smoothing=0.1 applies to --loss sigmoid",
    ),
    Cli(
        "dpo label smoothing of one half",
        lambda e: _dpo(e, "--label-smoothing", "0.5"),
        "must lie in [0, 0.5)",
    ),
    Cli("dpo negative beta", lambda e: _dpo(e, "--beta", "-1"), "beta=-1.0"),
    Cli(
        "dpo quantized base without lora",
        lambda e: _dpo(e, "--quantize-base", "nf4"),
        "a quantized base trains only with LoRA adapters",
    ),
    Cli(
        "dpo lora alpha without rank",
        lambda e: _dpo(e, "--lora-alpha", "8"),
        "need --lora-rank",
    ),
    Cli(
        "dpo prompt budget beyond the sequence",
        lambda e: _dpo(e, "--max-prompt-len", "32"),
        "max_prompt_len",
    ),
    Cli(
        "dpo sequence beyond the model",
        lambda e: _dpo(e, "--seq-len", "100000"),
        "beyond the base model's max_seq_len",
    ),
    Cli("dpo unknown setting", lambda e: _dpo(e, "--set", "betta=0.2"), "did you mean"),
    Cli(
        "reward negative centering",
        lambda e: _cmd("reward", e, "--center-coef", "-1"),
        "center_coef=-1.0",
    ),
    Cli(
        "reward trainable with lora",
        lambda e: _cmd("reward", e, "--lora-rank", "4", "--set", "trainable=layers.*"),
        "with LoRA, choose the adapted weights",
    ),
]
