"""The generated tasks with verifiable answers: deterministic, answers right, both formats hold the
same prompts, held-out and excluded prompts never reach a training file."""

from __future__ import annotations

import json
import re

import pytest

from llmjax.errors import ConfigError, UnknownName
from llmjax.recipes import rl_tasks, sft_tasks
from llmjax.rewards import answer_match

OPERANDS = re.compile(r"What is (\d+) \+ (\d+)\?\nAnswer:")


@pytest.mark.parametrize("task", sorted(rl_tasks.TASKS))
def test_records_are_deterministic_distinct_and_split_by_content(task):
    n = 500 if task == "add2x1" else 2000  # add2x1 has about 900 training prompts
    train = list(rl_tasks.records(task, n, seed=0))
    assert train == list(rl_tasks.records(task, n, seed=0))
    assert train != list(rl_tasks.records(task, n, seed=1))
    held = list(rl_tasks.records(task, 50, seed=1, split="heldout"))
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in held} & set(prompts)
    assert all(sft_tasks.is_heldout(r["prompt"]) for r in held)
    assert not any(sft_tasks.is_heldout(p) for p in prompts)


@pytest.mark.parametrize("task", ["add2", "add2x1", "add3"])
def test_answers_are_right_and_formats_agree(task):
    top_a, top_b = {"add2x1": (99, 9), "add2": (99, 99), "add3": (999, 999)}[task]
    grpo = list(rl_tasks.records(task, 300, seed=3, fmt="grpo"))
    sft = list(rl_tasks.records(task, 300, seed=3, fmt="sft"))
    assert [r["prompt"] for r in grpo] == [r["prompt"] for r in sft]
    for g, s in zip(grpo, sft, strict=True):
        assert set(g) == {"prompt", "answer"} and set(s) == {"prompt", "completion"}
        a, b = map(int, OPERANDS.fullmatch(g["prompt"]).groups())
        assert 0 <= a <= top_a and 0 <= b <= top_b
        assert g["answer"] == a + b and s["completion"] == f" {a + b}"
    # The SFT completion is exactly what the reward accepts, and a wrong sum is refused.
    reward = answer_match()
    answers = [r["answer"] for r in grpo]
    assert reward([], [r["completion"] for r in sft], answer=answers) == [1.0] * len(grpo)
    wrong = [f" {a + 1}" for a in answers]
    assert reward([], wrong, answer=answers) == [0.0] * len(grpo)


def test_reverse_is_sft_tasks_reverse_and_exact_answer_scores_it():
    grpo = list(rl_tasks.records("reverse", 300, seed=3, fmt="grpo"))
    sft = list(rl_tasks.records("reverse", 300, seed=3, fmt="sft"))
    assert sft == list(sft_tasks.records("reverse", 300, seed=3))
    for g, s in zip(grpo, sft, strict=True):
        words = g["prompt"].removeprefix("Reverse the words: ").removesuffix("\nAnswer:")
        assert g["answer"] == " ".join(reversed(words.split()))
        assert s["completion"] == " " + g["answer"]
    answers = [r["answer"] for r in grpo]
    completions = [r["completion"] for r in sft]
    assert rl_tasks.exact_answer([], completions, answer=answers) == [1.0] * len(grpo)
    # The words in the prompt's order, one word short, one word more: all wrong.
    wrong = [" " + " ".join(reversed(a.split())) for a in answers[:3]]
    wrong += [" " + a.rsplit(" ", 1)[0] for a in answers[3:6]] + [f" {a} the" for a in answers[6:9]]
    assert rl_tasks.exact_answer([], wrong, answer=answers[:9]) == [0.0] * 9
    # answer_match reads numbers only: it cannot score this task.
    assert answer_match()([], completions[:5], answer=answers[:5]) == [0.0] * 5
    with pytest.raises(ConfigError, match="text format"):
        list(rl_tasks.records("reverse", 5, fmt="text"))


def test_exclude_leaves_out_prompts_and_counts_against_the_size():
    first = list(rl_tasks.records("add2", 500, seed=0, fmt="sft"))
    taken = {r["prompt"] for r in first}
    rest = list(rl_tasks.records("add2", 3000, seed=0, exclude=taken))
    assert not taken & {r["prompt"] for r in rest}
    with pytest.raises(ConfigError, match="excluded"):
        list(rl_tasks.records("add2", 7700, exclude=taken))


def test_command_line_writes_jsonl_and_refuses_bad_requests(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    assert rl_tasks.main(["--task", "add2", "--format", "sft", "--n", "40", "--out", str(sft)]) == 0
    out = tmp_path / "prompts.jsonl"
    args = ["--task", "add2", "--n", "60", "--seed", "1", "--exclude", str(sft), "--out", str(out)]
    assert rl_tasks.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 60 and all(isinstance(r["answer"], int) for r in rows)
    assert not {r["prompt"] for r in rows} & rl_tasks.prompts_of(sft)
    assert rl_tasks.main(["--task", "add3", "--n", "2", "--split", "heldout", "--out", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    for bad in (["--n", "100000"], ["--exclude", str(tmp_path / "missing.jsonl")]):
        with pytest.raises(SystemExit):
            rl_tasks.main(["--task", "add2", "--out", str(tmp_path / "x.jsonl"), "--n", "5", *bad])
    with pytest.raises(UnknownName):
        list(rl_tasks.records("multiply", 5))
    with pytest.raises(ConfigError, match="format"):
        list(rl_tasks.records("add2", 5, fmt="chat"))
