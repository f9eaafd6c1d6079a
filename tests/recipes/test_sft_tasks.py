"""The generated fine-tuning tasks: deterministic, answers right, held-out prompts never trained."""

from __future__ import annotations

import json

import pytest

from llmjax.errors import ConfigError, UnknownName
from llmjax.recipes import sft_tasks


@pytest.mark.parametrize("task", sorted(sft_tasks.TASKS))
def test_records_are_deterministic_distinct_and_split_by_content(task):
    train = list(sft_tasks.records(task, 2000, seed=0))
    assert train == list(sft_tasks.records(task, 2000, seed=0))
    assert train != list(sft_tasks.records(task, 2000, seed=1))
    held = list(sft_tasks.records(task, 150, seed=1, split="heldout"))
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in held} & set(prompts)
    assert all(sft_tasks.is_heldout(r["prompt"]) for r in held)
    assert all(r["completion"].startswith(" ") for r in train + held)


def test_answers_are_right():
    words = lambda r: r["prompt"].split(": ", 1)[1].split("\n")[0].split()  # noqa: E731
    for r in sft_tasks.records("reverse", 50):
        assert r["completion"].split() == words(r)[::-1]
    for r in sft_tasks.records("sort", 50):
        assert r["completion"].split() == sorted(words(r))
    for r in sft_tasks.records("add", 50):
        a, b = r["prompt"].removeprefix("What is ").split("?")[0].split(" plus ")
        value = {sft_tasks.number_words(n): n for n in range(200)}
        assert value[r["completion"].strip()] == value[a] + value[b]
    assert sft_tasks.number_words(41) == "forty-one"
    assert sft_tasks.number_words(305) == "three hundred five"


def test_command_line_writes_jsonl_and_refuses_bad_requests(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    assert sft_tasks.main(["--task", "sort", "--n", "10", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"prompt", "completion"}
    with pytest.raises(SystemExit) as info:
        sft_tasks.main(["--task", "add", "--n", "100000", "--out", str(out)])
    assert info.value.code == 2 and "at most 90%" in capsys.readouterr().err
    with pytest.raises(UnknownName):
        list(sft_tasks.records("translate", 1))
    with pytest.raises(ConfigError):
        sft_tasks.number_words(1000)
