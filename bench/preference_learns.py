"""Preference tuning learns: DPO-family losses and a reward model on a generated task with a rule,
each stage run by the ``llmjax`` command a user types.

The base is a small Llama pretrained by ``llmjax pretrain`` (as in ``bench/sft_learns.py``), then
fine-tuned by ``llmjax sft`` on reversal records of which only a quarter answer right and the rest
stop a word short (``llmjax.recipes.preference_tasks``): its greedy answer is the short one. Each
loss type then tunes it with ``llmjax dpo`` on chosen (right) / rejected (wrong) pairs, and
``llmjax reward`` trains one reward model on the same pairs. Measured on 200 held-out prompts no
stage trains on:

- per loss: the run's held-out ``rewards/accuracies`` (its own held-out pairs), the rule's
  accuracy of the tuned policy's greedy answer, and its win / tie / loss count against the SFT
  base's greedy answer on the same prompt;
- the reward model's held-out accuracy (its run's), and the rule's accuracy of one sample of the
  SFT base (temperature 1) against the best of 8 by the reward model, from the same 8 samples.

    python bench/preference_learns.py --out runs/pref-bench --jobs 2

Finished runs are reused (each command resumes or reports its run complete). The last printed
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = "reverse"
# The base of bench/sft_learns.py: the default recipe's Llama at d_model 256, 300 steps.
BASE = ["--steps", "300", "--set", "model.d_model=256", "--set", "model.mlp_dim=768"]
DATA = {  # file: the preference_tasks arguments that write it
    "sft.jsonl": ["--kind", "sft", "--n", "5000", "--seed", "0"],
    "pairs.jsonl": ["--kind", "pairs", "--n", "5000", "--seed", "1"],
}
# One example per row: the 19-token prompt and the answer (at most 5 tokens with its eos) fill 24.
ROWS = ["--batch-size", "32", "--seq-len", "24"]
SFT = ["--steps", "1200", "--lr", "3e-3", *ROWS, "--set", "data.packing=false"]
SFT += ["--set", "loop.eval_every=400", "--set", "exact_match_prompts=0"]
SFT += ["--set", "loop.save_every=400", "--set", "loop.log_every=50"]
# Every preference run: full fine-tuning of the SFT run, whole prompts kept.
TUNE = [*ROWS, "--max-prompt-len", "20", "--set", "loop.log_every=25"]
LOSSES = {  # the row's name: the flags of its ``llmjax dpo`` run (beta: the command's default)
    "sigmoid": ["--loss", "sigmoid", "--steps", "200"],
    "hinge": ["--loss", "hinge"],
    "ipo": ["--loss", "ipo", "--steps", "200"],
    "robust": ["--loss", "robust", "--label-smoothing", "0.1"],
    "simpo": ["--loss", "simpo"],
    "orpo": ["--loss", "orpo"],
}
DPO = ["--steps", "100", "--lr", "1e-4"]
DPO += ["--set", "loop.eval_every=50", "--set", "loop.save_every=50"]
REWARD = ["--steps", "1000", "--lr", "3e-4", "--set", "loop.eval_every=100"]
REWARD += ["--set", "loop.save_every=200"]
PROMPTS = 200  # held-out prompts every policy answers
BEST_OF = 8
MAX_NEW_TOKENS = 8


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmjax.cli", *args]


def shown(cmd: list[str]) -> str:
    return "llmjax " + " ".join(cmd[3:])


def run_all(jobs: dict[str, list[str]], at_once: int, seconds: dict, cpu: dict) -> None:
    """Run the commands, ``at_once`` at a time, each one's output appended to ``RUN.log``; record
    each one's wall and CPU seconds (the CPU time is its own even when jobs share cores)."""
    pending, active = list(jobs), {}
    while pending or active:
        while pending and len(active) < at_once:
            name = pending.pop(0)
            cmd = jobs[name]
            print(shown(cmd), flush=True)
            log = open(out_of(cmd).with_suffix(".log"), "a")  # noqa: SIM115
            active[name] = (subprocess.Popen(cmd, stdout=log, stderr=log), time.time())
        for name, (proc, start) in list(active.items()):
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == 0:
                continue
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            if proc.returncode:
                log = out_of(jobs[name]).with_suffix(".log")
                raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
            seconds[name] = time.time() - start
            cpu[name] = usage.ru_utime + usage.ru_stime
            del active[name]
        time.sleep(1)


def out_of(cmd: list[str]) -> Path:
    return Path(cmd[cmd.index("--out") + 1])


def last_eval(run: Path, key: str) -> dict:
    from llmjax.train.metrics import read_metrics

    evals = [r for r in read_metrics(run) if key in r]
    return evals[-1] if evals else {}


class Policy:
    """A run's model and tokenizer, answering the held-out prompts."""

    def __init__(self, run: Path):
        import llmjax

        self.model, self.params = llmjax.load(run)
        self.tokenizer = llmjax.load_tokenizer(run)
        self.stops = tuple(self.tokenizer.stop_ids)

    def ids(self, prompt: str) -> list[int]:
        # As the fine-tuning data encodes a prompt: with the tokenizer's special tokens.
        return list(self.tokenizer.encode(prompt, add_special_tokens=True))

    def text(self, tokens) -> str:
        return self.tokenizer.decode([t for t in tokens if t not in self.stops])

    def greedy(self, prompts: list[str], batch_size: int = 50) -> list[str]:
        from llmjax.inference import generate

        answers = []
        for i in range(0, len(prompts), batch_size):
            out = generate(
                self.model,
                self.params,
                [self.ids(p) for p in prompts[i : i + batch_size]],
                max_new_tokens=MAX_NEW_TOKENS,
                temperature=0.0,
                stop_tokens=self.stops,
            )
            answers += [self.text(t) for t in out.tokens]
        return answers


def accuracy(prompts, answers) -> float:
    from llmjax.recipes.preference_tasks import rule

    return sum(rule(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)


def reward_model(policy: Policy, reward_run: Path, held: list[dict]) -> dict:
    """The reward model on held-out pairs, then one sample of ``policy`` against the reward
    model's best of ``BEST_OF`` on their prompts, both from the same samples."""
    import llmjax
    from llmjax.inference import best_of_n
    from llmjax.recipes.preference_tasks import habit, rule, win_rate

    rm = llmjax.load_reward_model(reward_run)
    eos = [policy.tokenizer.eos_id]  # the pairs it trained on end with eos
    chosen, rejected = (
        rm.score([policy.ids(r["prompt"] + r[side]) + eos for r in held])
        for side in ("chosen", "rejected")
    )
    right = chosen > rejected
    habitual = np.array([r["rejected"] == habit(r["prompt"]) for r in held])
    prompts = [r["prompt"] for r in held]
    first, best, mean, any_right = [], [], 0.0, 0
    for seed, prompt in enumerate(prompts):
        out = best_of_n(
            policy.model,
            policy.params,
            policy.ids(prompt),
            BEST_OF,
            reward_model=rm,
            temperature=1.0,
            max_new_tokens=MAX_NEW_TOKENS,
            stop_tokens=policy.stops,
            seed=seed,
        )
        samples = [policy.text(t) for t in out.samples.tokens]
        first.append(samples[0])
        best.append(policy.text(out.tokens))
        scored = [rule(prompt, s) for s in samples]
        mean += sum(scored) / len(scored)
        any_right += max(scored)
    vs = win_rate(prompts, best, first)
    return {
        "heldout_prompt_accuracy": float(right.mean()),
        "on_habit_pairs": float(right[habitual].mean()),
        "on_order_pairs": float(right[~habitual].mean()),
        "one_sample": accuracy(prompts, first),
        "mean_of_samples": mean / len(prompts),
        f"best_of_{BEST_OF}": accuracy(prompts, best),
        "any_sample_right": any_right / len(prompts),
        "best_vs_one_sample": [vs.wins, vs.ties, vs.losses],
    }


def evaluate(sft: Path, runs: dict[str, Path], reward: Path | None, n: int = PROMPTS) -> dict:
    """Every policy's greedy answers to ``n`` held-out prompts against the SFT run's, and the
    reward model (``reward``; None: none) on the same prompts."""
    from llmjax.recipes import preference_tasks

    held = preference_tasks.records(TASK, n, seed=0, split="heldout", kind="pairs")
    prompts = [r["prompt"] for r in held]
    ref = Policy(sft)
    ref_answers = ref.greedy(prompts)
    habit = [preference_tasks.habit(q).split() for q in prompts]
    habits = [a.split() == h for a, h in zip(ref_answers, habit, strict=True)]
    results = {"sft": {"rule_accuracy": accuracy(prompts, ref_answers), "habit": sum(habits) / n}}
    for name, run in runs.items():
        answers = Policy(run).greedy(prompts)
        vs = preference_tasks.win_rate(prompts, answers, ref_answers)
        metrics = last_eval(run, "eval_rewards/accuracies")
        results[name] = {
            "rewards/accuracies": metrics.get("eval_rewards/accuracies"),
            "rewards/margins": metrics.get("eval_rewards/margins"),
            "rule_accuracy": accuracy(prompts, answers),
            "win_rate": vs.rate,
            "wins_ties_losses": [vs.wins, vs.ties, vs.losses],
        }
    if reward is not None:
        results["reward"] = {
            "accuracy": last_eval(reward, "eval_accuracy").get("eval_accuracy"),
            **reward_model(ref, reward, held),
        }
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/pref-bench", help="where the base, data and runs go")
    p.add_argument("--jobs", type=int, default=1, help="preference runs at once")
    p.add_argument("--only", choices=list(LOSSES), action="append", help="run only these losses")
    p.add_argument("--base", help="an existing pretrained base to use instead of pretraining one")
    p.add_argument("--no-reward", action="store_true", help="skip the reward model")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from llmjax.recipes import preference_tasks

    for name, flags in DATA.items():
        if not (out / name).exists():
            tail = ["--task", TASK, *flags, "--out", str(out / name)]
            print("python -m llmjax.recipes.preference_tasks " + " ".join(tail), flush=True)
            preference_tasks.main(tail)
    seconds, cpu = {}, {}
    base = Path(args.base).resolve() if args.base else out / "base"
    if not args.base:
        run_all({"base": command("pretrain", "--out", str(base), *BASE)}, 1, seconds, cpu)
    sft = out / "sft"
    cmd = command("sft", "--base", str(base), "--data", str(out / "sft.jsonl"), "--out", str(sft))
    run_all({"sft": [*cmd, *SFT]}, 1, seconds, cpu)
    pairs = str(out / "pairs.jsonl")
    jobs = {}
    for name, flags in LOSSES.items():
        if not args.only or name in args.only:
            jobs[name] = command("dpo", "--base", str(sft), "--data", pairs)
            jobs[name] += ["--out", str(out / name), *TUNE, *DPO, *flags]
    if not args.no_reward:
        jobs["reward"] = command("reward", "--base", str(sft), "--data", pairs)
        jobs["reward"] += ["--out", str(out / "reward"), *TUNE, *REWARD]
    run_all(jobs, args.jobs, seconds, cpu)

    t0 = time.perf_counter()
    runs = {name: out / name for name in LOSSES if name in jobs}
    results = evaluate(sft, runs, out / "reward" if "reward" in jobs else None)
    seconds["evaluation"] = time.perf_counter() - t0

    print(f"{'run':<9}{'rewards/acc':>12}{'rule acc':>10}{'win rate':>10}{'W/T/L':>12}{'cpu s':>7}")
    for name, r in results.items():
        if name in LOSSES:
            print(
                f"{name:<9}{r['rewards/accuracies']:>12.3f}{r['rule_accuracy']:>10.3f}"
                f"{r['win_rate']:>10.3f}{'/'.join(map(str, r['wins_ties_losses'])):>12}"
                f"{cpu.get(name, float('nan')):>7.0f}"
            )
    print(f"sft: rule accuracy {results['sft']['rule_accuracy']:.3f} (greedy)")
    if "reward" in results:
        r = results["reward"]
        print(
            f"reward model: held-out accuracy {r['accuracy']:.3f}; one sample "
            f"{r['one_sample']:.3f}, best of {BEST_OF} {r[f'best_of_{BEST_OF}']:.3f}"
        )
    print(json.dumps({"results": results, "seconds": seconds, "cpu_seconds": cpu}))
    return results


if __name__ == "__main__":
    main()
