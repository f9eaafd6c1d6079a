"""Synthetic tasks with verifiable answers for reinforcement learning, and their SFT records.

Each task writes one JSON object a line in one of two formats:

- ``grpo``: ``{"prompt": ..., "answer": 57}``, the prompts ``llmjax grpo`` reads; the built-in
  ``answer_match`` reward compares the last number of a completion with ``answer``, and
  ``exact_answer`` (``--reward llmjax.recipes.rl_tasks:exact_answer``) the whole completion;
- ``sft``: ``{"prompt": ..., "completion": " 57"}``, the TRL prompt-completion records
  ``llmjax sft`` reads, to teach a base the answer's format before reinforcement learning;
- ``text``: plain lines, ``"12 + 45 = 57"``, the same sums written another way, for
  ``llmjax pretrain --data``: a base that has seen sums but not the question's format (the
  addition tasks only).

Tasks (``TASKS``), numbers written in digits, which a tokenizer trained on code keeps one piece each:

- ``add2x1``: ``"What is 12 + 7?\\nAnswer:"`` -> ``" 19"``; operands in 0..99 and 0..9;
- ``add2``: ``"What is 12 + 45?\\nAnswer:"`` -> ``" 57"``; both operands in 0..99;
- ``add3``: the same with operands in 0..999;
- ``reverse``: ``llmjax.recipes.sft_tasks``' task, ``"Reverse the words: list from data\\nAnswer:"``
  -> ``" data from list"``, the answer a string (``"data from list"``) that ``exact_answer``
  compares with the completion; its ``sft`` records are those of ``sft_tasks`` for the same seed.

Held-out split: ``llmjax.recipes.sft_tasks.is_heldout``, a fixed hash of the prompt alone, so a
training file and a held-out file never share a prompt whatever their seeds, sizes and formats.
``--exclude FILE`` leaves out the prompts of another file (the SFT records, say), so that the
prompts reinforcement learning trains and evaluates on are not those the format was taught with.

``python -m llmjax.recipes.rl_tasks --task add2 --format grpo --n 4000 --seed 0 --out F.jsonl``
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from llmjax.errors import ConfigError, InputError, LlmjaxError, UnknownName
from llmjax.recipes import sft_tasks
from llmjax.recipes.sft_tasks import HELDOUT_PERCENT, SPLITS, is_heldout

FORMATS = ("grpo", "sft", "text")


_OPERANDS = re.compile(r"What is (\d+) \+ (\d+)\?\nAnswer:")


def _adder(digits: int, digits_b: int | None = None) -> Callable[[random.Random], tuple[str, int]]:
    top_a, top_b = 10**digits - 1, 10 ** (digits_b or digits) - 1

    def sample(rng: random.Random) -> tuple[str, int]:
        a, b = rng.randint(0, top_a), rng.randint(0, top_b)
        return f"What is {a} + {b}?\nAnswer:", a + b

    return sample


def _reverse(rng: random.Random) -> tuple[str, str]:
    # sft_tasks' own sampler: a seed gives the same prompts in both modules, and the held-out
    # split is shared.
    prompt, completion = sft_tasks.TASKS["reverse"](rng)
    return prompt, completion.strip()


TASKS: dict[str, Callable[[random.Random], tuple[str, int | str]]] = {
    "add2x1": _adder(2, 1),
    "add2": _adder(2),
    "add3": _adder(3),
    "reverse": _reverse,
}


def _sum_text(prompt: str, answer: int) -> str:
    a, b = _OPERANDS.fullmatch(prompt).groups()
    return f"{a} + {b} = {answer}"


# The ``text`` format: the same facts written another way, for pretraining a base.
TEXTS = {"add2x1": _sum_text, "add2": _sum_text, "add3": _sum_text}
# Distinct prompts per task: a request near what a split holds is refused.
_SIZES = {"add2x1": 100 * 10, "add2": 100**2, "add3": 1000**2}
_SIZES["reverse"] = sft_tasks._SIZES["reverse"]


def exact_answer(prompts, completions, answer, **fields) -> list[float]:
    """1.0 where a completion, surrounding whitespace stripped, is the ``answer`` column's text.

    A reward function for ``--reward llmjax.recipes.rl_tasks:exact_answer``: the built-in
    ``answer_match`` reads only the last number of a completion, and ``reverse``'s answers hold
    none."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def records(
    task: str,
    n: int,
    seed: int = 0,
    split: str = "train",
    fmt: str = "grpo",
    exclude: Collection[str] = (),
) -> Iterator[dict]:
    """``n`` distinct records of ``task`` from ``split`` in format ``fmt``, none of whose prompts
    is in ``exclude``; the same for the same arguments."""
    if task not in TASKS:
        raise UnknownName(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: give one of {SPLITS}")
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: give one of {FORMATS}")
    if fmt == "text" and task not in TEXTS:
        raise ConfigError(f"task {task!r} has no text format; tasks with one: {', '.join(TEXTS)}")
    share = HELDOUT_PERCENT / 100 if split == "heldout" else 1 - HELDOUT_PERCENT / 100
    available = share * _SIZES[task] - len(exclude)
    if n > 0.9 * available:
        raise ConfigError(
            f"--n {n}: task {task!r} has about {int(available)} distinct {split} prompts left "
            f"(after {len(exclude)} excluded); ask for at most 90% of them"
        )
    exclude = set(exclude)
    # A string seed hashes the same on every platform; the format is not part of it, so the
    # two formats of the same arguments hold the same prompts.
    rng = random.Random(f"{task}:{seed}")
    sample, seen = TASKS[task], set()
    while len(seen) < n:
        prompt, answer = sample(rng)
        if prompt in seen or prompt in exclude or is_heldout(prompt) != (split == "heldout"):
            continue
        seen.add(prompt)
        if fmt == "grpo":
            yield {"prompt": prompt, "answer": answer}
        elif fmt == "sft":
            yield {"prompt": prompt, "completion": f" {answer}"}
        else:
            yield {"text": TEXTS[task](prompt, answer)}


def prompts_of(path: str | Path) -> set[str]:
    """The prompts of a jsonl file of records (either JSON format)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.add(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{i}: not a JSON object with a prompt") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llmjax.recipes.rl_tasks",
        description="Write a synthetic task with verifiable answers as jsonl.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--n", type=int, required=True, help="records to write")
    p.add_argument("--seed", type=int, default=0, help="which records (default: 0)")
    p.add_argument("--split", choices=SPLITS, default="train", help="(default: train)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="grpo",
        help="grpo: prompt and answer; sft: prompt and completion; text: plain lines "
        "such as '12 + 45 = 57' (default: grpo)",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="FILE", help="leave out its prompts"
    )
    p.add_argument("--out", required=True, help="the .jsonl file to write ('-' for stdout)")
    args = p.parse_args(argv)
    try:
        exclude = set().union(*(prompts_of(f) for f in args.exclude))
        rows = list(records(args.task, args.n, args.seed, args.split, args.format, exclude))
    except (LlmjaxError, OSError) as e:
        p.error(str(e))
    # Text is plain lines, what ``llmjax pretrain --data`` reads.
    line = (lambda r: r["text"]) if args.format == "text" else json.dumps
    lines = "".join(line(r) + "\n" for r in rows)
    if args.out == "-":
        sys.stdout.write(lines)
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
