"""Synthetic preference tasks: a rule decides which of two completions is better.

The prompts are those of ``llmjax.recipes.sft_tasks`` (three words from ``WORDS``, the same
held-out split by a hash of the prompt); a completion is right when its words are the task's
answer. Each task also has a *habit*, one systematic wrong answer: the right one with its last
word said twice, an answer that does not know when to stop.

- ``reverse``: ``"Reverse the words: list from data\\nAnswer:"`` -> ``" data from list"``; the
  habit is ``" data from list list"``.
- ``sort``: the answer is alphabetical order; the habit repeats its last word.

Why this habit: a small model learns to reverse only from records that show every step of it;
in a mix where most records teach something else (copying the words, say) it learns neither
well enough to sample right answers (docs/benchmarks.md, "Preference tuning learns"). With the
habit an extension of the answer every record teaches the whole answer, and the mix decides one
token: the end, or the last word again.

Two kinds of records, one JSON object a line:

- ``sft`` (``{"prompt", "completion"}``): the completion is the answer in exactly
  ``correct_fraction`` of the records (default 25%) and the habit in the rest. A model fine-tuned
  on them answers with the habit when decoding greedily, yet keeps the right answer likely enough
  to be sampled: the starting point preference tuning should move.
- ``pairs`` (``{"prompt", "chosen", "rejected"}``, TRL's preference format): the answer is chosen;
  the rejected completion is the habit in exactly ``habit_fraction`` of the pairs (default half)
  and another wrong order of the same words in the rest, so that telling the pairs apart needs
  the answer, not only "not the habit".

``rule(prompt, completion)`` is 1.0 for a right completion, else 0.0; ``prefer(prompt, a, b)`` is
+1 when ``a`` is better by the rule, -1 when ``b`` is, 0 for a tie; ``win_rate(prompts, ours,
theirs)`` counts wins, ties and losses over prompts.

``python -m llmjax.recipes.preference_tasks --task reverse --split train --kind pairs --n 4000
--seed 1 --out pairs.jsonl``
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmjax.errors import ConfigError, DataError, LlmjaxError, UnknownName
from llmjax.recipes import sft_tasks
from llmjax.recipes.sft_tasks import SPLITS, WORDS, is_heldout

__all__ = [
    "KINDS",
    "TASKS",
    "WORDS",
    "WinRate",
    "answer",
    "habit",
    "is_heldout",
    "main",
    "prefer",
    "records",
    "rule",
    "win_rate",
]

KINDS = ("sft", "pairs")
CORRECT_FRACTION = 0.25  # of sft records answered right
HABIT_FRACTION = 0.5  # of pairs whose rejected completion is the habit


@dataclass(frozen=True)
class _Task:
    prefix: str  # how every prompt of the task begins, as sft_tasks writes it
    answer: Callable[[list[str]], list[str]]
    habit: Callable[[list[str]], list[str]]  # never equal to the answer


TASKS = {
    "reverse": _Task("Reverse the words: ", lambda w: w[::-1], lambda w: [*w[::-1], w[0]]),
    "sort": _Task("Sort the words: ", sorted, lambda w: [*sorted(w), max(w)]),
}


def _parse(prompt: str) -> tuple[_Task, list[str]]:
    for task in TASKS.values():
        if prompt.startswith(task.prefix):
            return task, prompt[len(task.prefix) :].split("\n", 1)[0].split()
    known = ", ".join(repr(t.prefix) for t in TASKS.values())
    raise DataError(f"prompt {prompt[:40]!r} belongs to no preference task; prompts begin {known}")


def _text(words: Sequence[str]) -> str:
    return " " + " ".join(words)  # TRL's convention: prompt + completion reads as one text


def answer(prompt: str) -> str:
    """The right completion of ``prompt``."""
    task, words = _parse(prompt)
    return _text(task.answer(words))


def habit(prompt: str) -> str:
    """The task's systematic wrong completion of ``prompt``."""
    task, words = _parse(prompt)
    return _text(task.habit(words))


def rule(prompt: str, completion: str) -> float:
    """1.0 when the completion's words are the answer (spacing aside), else 0.0."""
    task, words = _parse(prompt)
    return float(completion.split() == task.answer(words))


def prefer(prompt: str, a: str, b: str) -> int:
    """+1 when the rule rates ``a`` above ``b``, -1 when below, 0 when equal."""
    ra, rb = rule(prompt, a), rule(prompt, b)
    return (ra > rb) - (ra < rb)


@dataclass(frozen=True)
class WinRate:
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        """The fraction of prompts won outright (ties count as not won)."""
        return self.wins / max(self.n, 1)


def win_rate(prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> WinRate:
    """How often ``ours[i]`` beats ``theirs[i]`` on ``prompts[i]`` by the rule."""
    if not len(prompts) == len(ours) == len(theirs):
        raise ConfigError(
            f"win_rate needs one completion of each side per prompt: {len(prompts)} prompts, "
            f"{len(ours)} and {len(theirs)} completions"
        )
    votes = [prefer(p, a, b) for p, a, b in zip(prompts, ours, theirs, strict=True)]
    return WinRate(votes.count(1), votes.count(0), votes.count(-1))


def _exactly(fraction: float, n: int, rng: random.Random) -> set[int]:
    """Which of ``n`` records get the first option: exactly ``round(fraction * n)``, by ``rng``."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"a fraction lies in [0, 1], got {fraction}")
    return set(rng.sample(range(n), round(fraction * n)))


def records(
    task: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    kind: str = "pairs",
    correct_fraction: float = CORRECT_FRACTION,
    habit_fraction: float = HABIT_FRACTION,
) -> list[dict]:
    """``n`` records of ``kind`` on distinct prompts of ``split``, the same for the same arguments.

    The prompts are ``sft_tasks.records(task, n, seed, split)``'s: the split follows the prompt
    alone, so no training file of either kind shares a prompt with a held-out one.
    """
    if task not in TASKS:  # sft_tasks has more: those without an order of the words to rate
        raise UnknownName(f"unknown preference task {task!r}; tasks: {', '.join(TASKS)}")
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r}: give one of {KINDS}")
    prompts = [r["prompt"] for r in sft_tasks.records(task, n, seed, split)]
    # A stream apart from the prompts' own: the same prompts whatever the fractions.
    rng = random.Random(f"{task}:{kind}:{seed}:{split}")
    if kind == "sft":
        right = _exactly(correct_fraction, n, rng)
        return [
            {"prompt": p, "completion": answer(p) if i in right else habit(p)}
            for i, p in enumerate(prompts)
        ]
    habitual = _exactly(habit_fraction, n, rng)
    rows = []
    for i, p in enumerate(prompts):
        chosen = answer(p)
        if i in habitual:
            rejected = habit(p)
        else:
            orders = [_text(o) for o in itertools.permutations(_parse(p)[1])]
            rejected = rng.choice([o for o in orders if o != chosen])
        rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llmjax.recipes.preference_tasks",
        description="Write a synthetic preference task as jsonl: SFT records that mostly answer "
        "wrong, or chosen/rejected pairs.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--kind", choices=KINDS, default="pairs", help="(default: pairs)")
    p.add_argument("--n", type=int, required=True, help="records to write")
    p.add_argument("--seed", type=int, default=0, help="which records (default: 0)")
    p.add_argument("--split", choices=SPLITS, default="train", help="(default: train)")
    p.add_argument(
        "--correct-fraction",
        type=float,
        default=CORRECT_FRACTION,
        help=f"sft: records answered right, the rest with the habit (default: {CORRECT_FRACTION})",
    )
    p.add_argument(
        "--habit-fraction",
        type=float,
        default=HABIT_FRACTION,
        help="pairs: rejected completions that are the habit, the rest other wrong orders "
        f"(default: {HABIT_FRACTION})",
    )
    p.add_argument("--out", required=True, help="the .jsonl file to write ('-' for stdout)")
    args = p.parse_args(argv)
    try:
        rows = records(
            args.task,
            args.n,
            args.seed,
            args.split,
            args.kind,
            args.correct_fraction,
            args.habit_fraction,
        )
    except LlmjaxError as e:
        p.error(str(e))
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
