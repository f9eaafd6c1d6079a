"""The generated preference tasks: the rule is right, the mix is as asked, held-out prompts stay
held out, the same seed writes the same file."""

from __future__ import annotations

import json

import pytest

from llmjax.errors import ConfigError, DataError, UnknownName
from llmjax.recipes import preference_tasks as pt


def words(prompt):
    return prompt.split(": ", 1)[1].split("\n")[0].split()


@pytest.mark.parametrize("task", sorted(pt.TASKS))
@pytest.mark.parametrize("kind", pt.KINDS)
def test_split_by_prompt_and_deterministic_by_seed(task, kind):
    train = pt.records(task, 1000, seed=0, kind=kind)
    assert train == pt.records(task, 1000, seed=0, kind=kind)
    assert train != pt.records(task, 1000, seed=1, kind=kind)
    held = pt.records(task, 150, seed=0, split="heldout", kind=kind)
    other = pt.records(task, 1000, seed=1, kind="sft" if kind == "pairs" else "pairs")
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == len(prompts)
    assert not {r["prompt"] for r in held} & (set(prompts) | {r["prompt"] for r in other})
    assert all(pt.is_heldout(r["prompt"]) for r in held)
    assert not any(pt.is_heldout(p) for p in prompts)


def test_rule_answer_and_habit():
    p = "Reverse the words: list from data\nAnswer:"
    assert pt.answer(p) == " data from list" and pt.habit(p) == " data from list list"
    assert pt.rule(p, " data from list") == 1.0
    assert pt.rule(p, "data  from list\n") == 1.0  # spacing is not part of the answer
    for wrong in (" list from data", " data list from", " data from", " data from list list", ""):
        assert pt.rule(p, wrong) == 0.0
    s = "Sort the words: with code this\nAnswer:"
    assert pt.answer(s) == " code this with" and pt.habit(s) == " code this with with"
    assert pt.rule(s, " code this with") == 1.0 and pt.rule(s, " with code this") == 0.0
    for task in pt.TASKS:
        for r in pt.records(task, 200, kind="sft"):
            w = words(r["prompt"])
            want = w[::-1] if task == "reverse" else sorted(w)
            assert pt.rule(r["prompt"], r["completion"]) == float(r["completion"].split() == want)
            assert pt.habit(r["prompt"]) != pt.answer(r["prompt"])
    with pytest.raises(DataError, match="no preference task"):
        pt.rule("What is one plus two?\nAnswer:", " three")


def test_prefer_and_win_rate():
    p = "Reverse the words: list from data\nAnswer:"
    right, wrong, other = " data from list", " list from data", " from list data"
    assert pt.prefer(p, right, wrong) == 1 and pt.prefer(p, wrong, right) == -1
    assert pt.prefer(p, wrong, other) == 0 and pt.prefer(p, right, right) == 0
    score = pt.win_rate([p] * 4, [right, right, wrong, wrong], [wrong, right, other, right])
    assert (score.wins, score.ties, score.losses, score.n) == (1, 2, 1, 4)
    assert score.rate == 0.25
    with pytest.raises(ConfigError):
        pt.win_rate([p], [right], [])


@pytest.mark.parametrize("task", sorted(pt.TASKS))
def test_pairs_are_well_formed(task):
    pairs = pt.records(task, 400, seed=3, kind="pairs", habit_fraction=0.5)
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in pairs)
    for r in pairs:
        p = r["prompt"]
        assert p.endswith("\nAnswer:") and r["chosen"].startswith(" ")
        assert r["rejected"].startswith(" ") and r["chosen"] != r["rejected"]
        assert r["chosen"] == pt.answer(p) and pt.rule(p, r["rejected"]) == 0.0
        if r["rejected"] != pt.habit(p):  # a wrong order of the same words
            assert sorted(r["rejected"].split()) == sorted(words(p))
    habits = sum(r["rejected"] == pt.habit(r["prompt"]) for r in pairs)
    assert habits == 200
    # The other half spread over all five wrong orders, not one.
    others = [r for r in pairs if r["rejected"] != pt.habit(r["prompt"])]
    orders = {tuple(map(r["chosen"].split().index, r["rejected"].split())) for r in others}
    assert len(orders) == 5


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.6, 1.0])
def test_sft_mix_fraction_is_exact(fraction):
    rows = pt.records("reverse", 400, seed=2, kind="sft", correct_fraction=fraction)
    right = [pt.rule(r["prompt"], r["completion"]) for r in rows]
    assert sum(right) == round(400 * fraction)
    assert all(
        ok or r["completion"] == pt.habit(r["prompt"]) for ok, r in zip(right, rows, strict=True)
    )
    # The prompts do not depend on the mix.
    same = pt.records("reverse", 400, seed=2, kind="sft", correct_fraction=0.5)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in same]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    args = ["--task", "reverse", "--kind", "sft", "--n", "40", "--seed", "5", "--out", str(out)]
    assert pt.main([*args, "--correct-fraction", "0.25"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == pt.records("reverse", 40, seed=5, kind="sft")
    assert sum(pt.rule(r["prompt"], r["completion"]) for r in rows) == 10
    assert pt.main(["--task", "sort", "--split", "heldout", "--n", "5", "--out", "-"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == 5 and set(printed[0]) == {"prompt", "chosen", "rejected"}
    with pytest.raises(SystemExit) as info:
        pt.main([*args, "--correct-fraction", "1.5"])
    assert info.value.code == 2 and "[0, 1]" in capsys.readouterr().err
    with pytest.raises(UnknownName, match="unknown preference task"):
        pt.records("add", 1)
