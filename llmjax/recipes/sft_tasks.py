"""Synthetic supervised fine-tuning tasks with exact answers and a held-out split by content.

Each task writes TRL-format records, ``{"prompt": ..., "completion": ...}``, one JSON object a
line; the completion starts with a space so that ``prompt + completion`` reads as one text (the
TRL convention for prompt-completion data). A base model pretrained on code answers none of them;
a fine-tuned one is scored by greedy decoding (``llmjax.recipes.sft.exact_match``).

Tasks (``TASKS``):

- ``reverse``: ``"Reverse the words: list from data\\nAnswer:"`` -> ``" data from list"``; three
  distinct words from a fixed list of 46 (``WORDS``).
- ``sort``: the same words, to be put in alphabetical order.
- ``add``: ``"What is seventeen plus twenty-four?\\nAnswer:"`` -> ``" forty-one"``; both operands
  in 0..99, numbers written in English words.

Held-out split. Whether a record is held out depends on its prompt alone (a fixed hash of its
content, ``HELDOUT_PERCENT`` of all prompts), never on the seed: a training file and a held-out
file never share a prompt whatever their seeds and sizes. Within a split, ``--seed`` picks which
records and ``--n`` how many; a file holds no prompt twice.

``python -m llmjax.recipes.sft_tasks --task reverse --split train --n 4000 --seed 0 --out F.jsonl``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator, Sequence

from llmjax.errors import ConfigError, LlmjaxError, UnknownName

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout")
N_WORDS = 3  # words per reverse or sort prompt

# Everyday English words that are also common in Python source, so that a tokenizer trained on
# code (as ``llmjax pretrain``'s default one is) keeps each of them, after a space, one piece.
_WORD_TEXT = (
    "add all and are call can class code data file for from function get has if import key line "
    "list module name new not number object option other out path read return set string that "
    "the this time type use used value when which will with"
)
WORDS = tuple(_WORD_TEXT.split())

_ONES_TEXT = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_ONES = _ONES_TEXT.split()
_TENS = [""] * 2 + ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """``n`` in 0..999 in English words: 41 -> "forty-one", 305 -> "three hundred five"."""
    if not 0 <= n <= 999:
        raise ConfigError(f"number_words takes 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} {number_words(rest)}"


# A sampler draws one (prompt, completion) from a random.Random; the split is applied after.
def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, N_WORDS)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _words(rng)
    return f"Reverse the words: {' '.join(w)}\nAnswer:", " " + " ".join(reversed(w))


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _words(rng)
    return f"Sort the words: {' '.join(w)}\nAnswer:", " " + " ".join(sorted(w))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    prompt = f"What is {number_words(a)} plus {number_words(b)}?\nAnswer:"
    return prompt, " " + number_words(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
}
# Distinct prompts per task (at least): a request near what a split holds is refused.
_SIZES = {
    "reverse": math.perm(len(WORDS), N_WORDS),
    "sort": math.perm(len(WORDS), N_WORDS),
    "add": 100 * 100,
}


def is_heldout(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out split: a fixed function of its text."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def records(task: str, n: int, seed: int = 0, split: str = "train") -> Iterator[dict]:
    """``n`` distinct records of ``task`` from ``split``, the same for the same arguments."""
    if task not in TASKS:
        raise UnknownName(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: give one of {SPLITS}")
    share = HELDOUT_PERCENT / 100 if split == "heldout" else 1 - HELDOUT_PERCENT / 100
    if n > 0.9 * share * _SIZES[task]:
        raise ConfigError(
            f"--n {n}: task {task!r} has about {int(share * _SIZES[task])} distinct {split} "
            "prompts; ask for at most 90% of them"
        )
    rng = random.Random(f"{task}:{seed}")  # a string seed hashes the same on every platform
    sample, seen = TASKS[task], set()
    while len(seen) < n:
        prompt, completion = sample(rng)
        if prompt in seen or is_heldout(prompt) != (split == "heldout"):
            continue
        seen.add(prompt)
        yield {"prompt": prompt, "completion": completion}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m llmjax.recipes.sft_tasks",
        description="Write a synthetic SFT task as prompt-completion jsonl.",
    )
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--n", type=int, required=True, help="records to write")
    p.add_argument("--seed", type=int, default=0, help="which records (default: 0)")
    p.add_argument("--split", choices=SPLITS, default="train", help="(default: train)")
    p.add_argument("--out", required=True, help="the .jsonl file to write ('-' for stdout)")
    args = p.parse_args(argv)
    try:
        rows = list(records(args.task, args.n, args.seed, args.split))
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
