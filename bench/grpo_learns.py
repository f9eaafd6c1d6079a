"""Reinforcement learning learns: held-out greedy exact match on reversing three words before and
after GRPO, Dr. GRPO, DAPO and PPO, each stage run by the ``llmjax`` command a user types.

The base is ``bench/sft_learns.py``'s: a small Llama pretrained by ``llmjax pretrain`` on the
Python standard library (no download). A short ``llmjax sft`` on its 5,000 records (``"Reverse the
words: list from data\\nAnswer:"`` -> ``" data from list"``; 600 steps where ``sft_learns`` runs
2,000); reinforcement learning starts from its step-400 checkpoint, which knows the format but is
weak at the task, and right in eight samples at temperature 1 on many more prompts than its greedy
answer is. Each row trains that model with the ``exact_answer`` reward
(``llmjax.recipes.rl_tasks:exact_answer``, 1 when the completion is the reversed words; the
built-in ``answer_match`` reads numbers only) on 8,000 other prompts (``python -m
llmjax.recipes.rl_tasks --task reverse``, none of them in the SFT records).

Exact match is the runs' own evaluation: greedy decoding of the same 200 held-out prompts of the
GRPO prompt file (the ones ``llmjax grpo`` and ``llmjax ppo`` hold out by a hash of the prompt and
never train on), scored by ``exact_answer``; ``eval_rewards/exact_answer/mean`` at each
evaluation. "Before" scores the SFT model the same way, with pass@1 and pass@8 of eight samples at
temperature 1.

    python bench/grpo_learns.py --out runs/grpo-bench

Finished runs are reused (each command resumes or reports its run complete). The last printed
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = "reverse"
REWARD = "llmjax.recipes.rl_tasks:exact_answer"
# bench/sft_learns.py's base.
BASE = ["--steps", "300", "--set", "model.d_model=256", "--set", "model.mlp_dim=768"]
SFT_RECORDS = 5000
# A third of sft_learns' 2,000 steps: the format, and the task only in part.
SFT = ["--steps", "600", "--lr", "3e-3", "--batch-size", "32", "--seq-len", "32"]
SFT += ["--set", "data.packing=false", "--set", "loop.eval_every=0"]
SFT += ["--set", "exact_match_prompts=200", "--set", "max_new_tokens=8"]
SFT += ["--set", "loop.save_every=100", "--set", "loop.log_every=50", "--set", "loop.keep_last=20"]
# Reinforcement learning starts from this checkpoint of the SFT run: greedy exact match near 0.3
# and pass@8 near 0.5, where the run's end (near 0.5 greedy) leaves less to gain and the 300-step
# checkpoint (0.24 greedy, pass@8 0.34) little sampled headroom.
START = 400
GRPO_PROMPTS = 8000
EVAL_PROMPTS = 200
MAX_NEW_TOKENS = 8
COMMON = ["--reward", REWARD, "--max-new-tokens", str(MAX_NEW_TOKENS)]
COMMON += ["--set", f"eval_prompts={EVAL_PROMPTS}", "--set", "loop.log_every=5"]
# GRPO: 64 prompts x 8 completions a step at lr 1e-3 with a KL penalty (beta 0.1) to the start,
# 500 steps. At 16 prompts a step a learning rate above 2e-4 collapsed the policy onto its greedy
# answers (entropy to about 0.1) before they improved; 64 prompts let 1e-3 help, and the KL term
# keeps the policy sampling (docs/benchmarks.md, "RL learns").
LONG = ["--steps", "500", "--lr", "1e-3", "--beta", "0.1"]
LONG += ["--set", "loop.eval_every=50", "--set", "loop.save_every=100"]
# The first table's settings: 100 steps at lr 2e-4, no KL penalty, 16 prompts x 8 completions
# for the group methods; PPO samples one completion of 64 prompts and makes four passes over
# them, with a critic as large as the policy: at 128 prompts a step it ran about 5 times slower
# than GRPO on one CPU core.
SHORT = ["--steps", "100", "--lr", "2e-4"]
SHORT += ["--set", "loop.eval_every=25", "--set", "loop.save_every=50"]
GROUPS = ["--batch-size", "16", "--num-generations", "8"]
RUNS = {
    "GRPO": ["grpo", "--batch-size", "64", "--num-generations", "8", *LONG],
    "Dr. GRPO": ["grpo", *GROUPS, *SHORT, "--loss-type", "dr_grpo", "--scale-rewards", "none"],
    "DAPO": ["grpo", *GROUPS, *SHORT, "--loss-type", "dapo", "--epsilon-high", "0.28"]
    + ["--dynamic-sampling", "--mask-truncated"],
    "PPO": ["ppo", "--batch-size", "64", "--num-generations", "1", *SHORT],
}


def llmjax_cli(*args: str) -> float:
    print("llmjax " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmjax.cli", *args], check=True)
    return time.perf_counter() - t0


def tasks_cli(*args: str) -> None:
    print("python -m llmjax.recipes.rl_tasks " + " ".join(args), flush=True)
    from llmjax.recipes import rl_tasks

    rl_tasks.main(list(args))


def before(run: Path, prompts: Path, samples: int = 8) -> dict:
    """``run``'s greedy exact match on the held-out prompts the RL runs evaluate on, and pass@1
    and pass@``samples`` of ``samples`` completions each at temperature 1."""
    import numpy as np

    from llmjax.data.prompts import PromptDataConfig, build_prompt_data
    from llmjax.inference import generate
    from llmjax.recipes.rl_tasks import exact_answer
    from llmjax.runs import load_run

    r = load_run(run)
    tok = r.tokenizer
    data = build_prompt_data(PromptDataConfig(path=str(prompts)), tok, r.model.config.vocab_size)
    held = data.heldout[:EVAL_PROMPTS]
    ids = [p.ids for p in held]
    answers = [p.fields["answer"] for p in held]

    def hits(temperature: float, seed: int = 0) -> np.ndarray:
        out = generate(
            r.model,
            r.params,
            ids,
            max_new_tokens=MAX_NEW_TOKENS,
            temperature=temperature,
            stop_tokens=tuple(tok.stop_ids),
            seed=seed,
        )
        return np.array(exact_answer([], [tok.decode(t) for t in out.tokens], answer=answers))

    sampled = np.stack([hits(1.0, seed) for seed in range(samples)])
    return {
        "exact_match": float(hits(0.0).mean()),
        "pass@1": float(sampled.mean()),
        f"pass@{samples}": float(sampled.max(0).mean()),
        # Prompts whose group of samples is neither all right nor all wrong: GRPO learns only
        # from those.
        "mixed_groups": float((sampled.max(0) > sampled.min(0)).mean()),
    }


def curve(run: Path) -> list[dict]:
    """The eval points of an RL run, each with the mean sampled reward since the last one."""
    from llmjax.train.metrics import read_metrics

    points, rewards = [], []
    for r in read_metrics(run):
        if "reward" in r:
            rewards.append(r["reward"])
        if "eval_reward" in r:
            train = sum(rewards) / len(rewards) if rewards else None
            points.append({"step": r["step"], "eval": r["eval_reward"], "train_reward": train})
            rewards = []
    return points


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grpo-bench", help="where the base, data and runs go")
    p.add_argument("--only", choices=list(RUNS), action="append", help="run only these")
    p.add_argument("--base", help="an existing base run to use instead of pretraining one")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base, sft = out / "base", out / "sft"
    sft_data, prompts = out / "reverse.jsonl", out / "prompts.jsonl"
    task = ["--task", TASK]
    if not sft_data.exists():
        # The same records as bench/sft_learns.py's reverse.jsonl.
        tasks_cli(*task, "--format", "sft", "--n", str(SFT_RECORDS), "--out", str(sft_data))
    if not prompts.exists():
        tasks_cli(
            *task,
            "--n",
            str(GRPO_PROMPTS),
            "--seed",
            "1",
            "--exclude",
            str(sft_data),
            "--out",
            str(prompts),
        )
    seconds = {}
    if args.base:
        base = Path(args.base).resolve()
    else:
        seconds["base"] = llmjax_cli("pretrain", "--out", str(base), *BASE)
    seconds["sft"] = llmjax_cli(
        "sft", "--base", str(base), "--data", str(sft_data), "--out", str(sft), *SFT
    )
    start = sft / "checkpoints" / str(START)
    results = {"SFT (before RL)": before(start, prompts)}
    for name, (command, *extra) in RUNS.items():
        if args.only and name not in args.only:
            continue
        run = out / name.replace(". ", "-").replace(" ", "-").lower()
        cmd = [command, "--base", str(start), "--data", str(prompts), "--out", str(run), *COMMON]
        seconds[name] = llmjax_cli(*cmd, *extra)
        points = curve(run)
        results[name] = {"exact_match": points[-1]["eval"], "curve": points}
    print(f"{'run':<18}{'exact match':>12}{'seconds':>9}")
    for name, r in results.items():
        print(f"{name:<18}{r['exact_match']:>12.3f}{seconds.get(name, float('nan')):>9.0f}")
    summary = {"results": results, "seconds": seconds}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
