"""Bad-input rows for ``llmjax grpo`` and ``llmjax ppo``: the prompts, the reward functions and
the RL settings. Each fails before any training step runs; the base is the shared pretraining
run."""

from __future__ import annotations

import json

from tests.bad_inputs import Cli, Env


def _prompts(env: Env, rows: list[dict] | None = None) -> str:
    if rows is None:
        rows = [{"prompt": f"what is {i} plus {i}", "answer": str(2 * i)} for i in range(40)]
    return env.write("prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _cmd(command: str, env: Env, *extra: str, data=None, reward="answer_match") -> list[str]:
    data = _prompts(env) if data is None else data
    args = [command, "--base", str(env.run), "--data", data, "--out", str(env.tmp / "out")]
    args += ["--steps", "1", "--max-new-tokens", "4", "--batch-size", "2"]
    return [*args, *(["--reward", reward] if reward else []), *extra]


def _grpo(env: Env, *extra: str, **kw) -> list[str]:
    return _cmd("grpo", env, *extra, **kw)


def _raising(env: Env) -> str:
    path = env.write("rewards.py", "def bad(prompts, completions, **f):\n    raise KeyError('x')\n")
    return f"{path}:bad"


CASES = [
    Cli("grpo no reward", lambda e: _grpo(e, reward=None), "give a --reward or a --reward-model"),
    Cli("grpo unknown reward", lambda e: _grpo(e, reward="exact"), "unknown reward 'exact'"),
    Cli(
        "grpo reward module missing",
        lambda e: _grpo(e, reward="no_such_module_here:fn"),
        "no_such_module_here",
    ),
    Cli("grpo reward that raises", lambda e: _grpo(e, reward=_raising(e)), "'bad' raised KeyError"),
    Cli(
        "grpo reward weights count",
        lambda e: _grpo(e, "--reward-weights", "1,2"),
        "2 reward weights for 1 rewards",
    ),
    Cli(
        "grpo reward weights not numbers",
        lambda e: _grpo(e, "--reward-weights", "one"),
        "write numbers separated by commas",
    ),
    Cli(
        "grpo one generation",
        lambda e: _grpo(e, "--num-generations", "1"),
        "num_generations must be at least 2",
    ),
    Cli("grpo epsilon of one", lambda e: _grpo(e, "--epsilon", "1"), "epsilon=1.0"),
    Cli(
        "grpo prompts without a prompt field",
        lambda e: _grpo(e, data=_prompts(e, [{"question": "x"}] * 5)),
        "prompt",
    ),
    Cli(
        "grpo completion beyond the model",
        lambda e: _grpo(e, "--max-new-tokens", "100000"),
        "beyond the base model's max_seq_len",
    ),
    Cli(
        "grpo reward model that is not one",
        lambda e: _grpo(e, "--reward-model", str(e.run)),
        "llmjax reward",
    ),
    Cli(
        "ppo dynamic sampling",
        lambda e: _cmd("ppo", e, "--set", "dynamic_sampling=true"),
        "--dynamic-sampling is GRPO's",
    ),
    Cli("ppo lambda beyond one", lambda e: _cmd("ppo", e, "--lam", "2"), "gamma and lam"),
]
