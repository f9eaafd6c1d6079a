"""Reward functions on text: the built-ins' edge cases, loading by spec, and score()'s checks."""

import math

import numpy as np
import pytest

from llmjax.errors import ConfigError, LlmjaxError, RewardError, UnknownName
from llmjax.rewards import (
    BUILTINS,
    answer_match,
    format_match,
    length_penalty,
    load_reward,
    reward_metrics,
    reward_name,
    score,
)


def _one(fn, completion, **fields):
    return fn(prompts=["p"], completions=[completion], **{k: [v] for k, v in fields.items()})[0]


@pytest.mark.parametrize(
    "completion,answer,want",
    [
        ("The answer is 42.", 42, 1.0),
        ("no number here", 42, 0.0),
        ("3 apples and 5 pears make 8", 8, 1.0),  # several numbers: the last counts
        ("8 is wrong; it is 7", 8, 0.0),
        ("so x = -3", -3, 1.0),
        ("so x = -3.50", "-3.5", 1.0),  # numbers compare by value
        ("half: .5", 0.5, 1.0),
        ("0.5", "0.50", 1.0),
        ("1,000 apples", 1000, 1.0),  # thousands commas
        ("1,000,000", 1e6, 1.0),
        ("$1,000.50", "1000.5", 1.0),
        ("1000", "1,000", 1.0),
        ("12,34", 34, 1.0),  # not grouped by three: two numbers
        ("12,34", 1234, 0.0),
        ("pages 3-5", 5, 1.0),  # a range, not a negative number
        ("pages 3-5", -5, 0.0),
        ("v1.2.3 x2", 3, 0.0),  # no numbers inside words or versions
        ("1/2", 0.5, 0.0),  # fractions are not evaluated
        ("1e3", 1000, 0.0),  # nor exponents
        ("42", "forty-two", 0.0),  # a text answer compares as text
        ("answer: 7", " 7 ", 1.0),
    ],
)
def test_answer_match_last_number(completion, answer, want):
    assert _one(answer_match(), completion, answer=answer) == want


@pytest.mark.parametrize(
    "completion,answer,want",
    [
        ("<think>2 + 2</think><answer>4</answer>", 4, 1.0),
        ("<think>2 + 2 = 4</think>", 4, 0.0),  # no tag
        ("<answer>4", 4, 0.0),  # unclosed
        ("<answer>3</answer> no, <answer>4</answer>", 4, 1.0),  # the last tag counts
        ("<answer> 1,000 </answer>", 1000, 1.0),
        ("<answer>\n-2.50\n</answer>", -2.5, 1.0),
        ("<answer>Paris</answer>", "Paris", 1.0),
        ("<answer>paris</answer>", "Paris", 0.0),  # text compares exactly
        ("<answer>x = 5</answer>", 5, 0.0),  # the whole tag must be the value
    ],
)
def test_answer_match_answer_tag(completion, answer, want):
    assert _one(answer_match(extract="answer_tag"), completion, answer=answer) == want


def test_answer_match_field_and_name():
    fn = answer_match(field="solution", name="correct")
    assert fn.__name__ == "correct" == reward_name(fn)
    assert fn(prompts=["a", "b"], completions=["1", "2"], solution=[1, 3], other=[0, 0]) == [
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="'solution'.*lacks"):
        fn(prompts=["a"], completions=["1"], answer=[1])
    with pytest.raises(ValueError, match="None at index 1"):
        fn(prompts=["a", "b"], completions=["1", "2"], solution=[1, None])
    with pytest.raises(ValueError, match="extract"):
        answer_match(extract="boxed")


def test_format_match():
    fn = format_match()
    good = "<think>first\nthen</think>\n<answer>4</answer>\n"
    assert fn(prompts=["p"] * 3, completions=[good, "<answer>4</answer>", good + "more"]) == [
        1.0,
        0.0,
        0.0,
    ]
    anywhere = format_match(r"<answer>\d+</answer>", search=True, name="has_answer")
    assert anywhere.__name__ == "has_answer"
    assert anywhere(prompts=["p", "p"], completions=["so <answer>4</answer>.", "4"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="pattern"):
        format_match("(unclosed")


def test_length_penalty():
    fn = length_penalty(100, buffer=20)
    texts = ["a" * n for n in (0, 80, 81, 90, 100, 101, 500)]
    got = fn(prompts=["p"] * len(texts), completions=texts)
    assert got == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]
    assert all(math.copysign(1, x) == 1 for x in got[:2])  # +0.0, not -0.0
    assert length_penalty(8).__name__ == "length_penalty"
    tokens = length_penalty(4, buffer=2, unit="tokens")
    ids = [[1, 2], [1, 2, 3], [1, 2, 3, 4, 5]]
    assert tokens(prompts=["p"] * 3, completions=["x"] * 3, completion_ids=ids) == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="completion_ids"):
        tokens(prompts=["p"], completions=["x"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": 10, "buffer": 0}, "buffer"),
        ({"max_length": 10, "buffer": 11}, "buffer"),
        ({"unit": "words"}, "unit"),
    ],
)
def test_length_penalty_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        length_penalty(**kwargs)


def test_load_reward_builtins():
    for name, factory in BUILTINS.items():
        fn = load_reward(name)
        assert fn.__name__ == name == factory().__name__
        assert len(fn(prompts=["p"], completions=["1"], answer=[1])) == 1


_MODULE = """
def exact(prompts, completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]

class Holder:
    @staticmethod
    def nested(prompts, completions, **kwargs):
        return [0.5] * len(completions)

NOT_A_FUNCTION = 3
"""


def test_load_reward_from_module_and_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards_7x.py"
    path.write_text(_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("my_rewards_7x:exact", f"{path}:exact"):
        fn = load_reward(spec)
        assert fn.__name__ == "exact"
        assert fn(prompts=["p", "p"], completions=["a", "b"], answer=["a", "c"]) == [1.0, 0.0]
    assert load_reward("my_rewards_7x:Holder.nested")(prompts=[], completions=["x"]) == [0.5]


@pytest.mark.parametrize(
    "spec,error,match",
    [
        ("nope", UnknownName, "unknown reward 'nope'.*answer_match"),
        ("no_such_module_q9:fn", UnknownName, "no module named 'no_such_module_q9'"),
        ("llmjax.rewards:nope", UnknownName, "no attribute 'nope'"),
        ("llmjax.rewards:EXTRACTS", ConfigError, "tuple, not a function"),
        ("missing_dir_q9/r.py:fn", UnknownName, "no file"),
        ("broken_dep_q9:fn", ConfigError, "importing 'broken_dep_q9' failed.*not_installed_q9"),
        ("raises_q9:fn", ConfigError, "importing 'raises_q9' failed: RuntimeError: boom"),
        (":fn", UnknownName, "module:function"),
    ],
)
def test_load_reward_errors(spec, error, match, tmp_path, monkeypatch):
    (tmp_path / "broken_dep_q9.py").write_text("import not_installed_q9\n")
    (tmp_path / "raises_q9.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(error, match=match):
        load_reward(spec)


def _const(value, name):
    def fn(prompts, completions, **kwargs):
        return [value] * len(completions)

    fn.__name__ = name
    return fn


def test_score_weights_and_fields():
    calls = []

    def seen(prompts, completions, answer, **kwargs):
        calls.append((prompts, completions, answer, kwargs))
        completions.append("edited")  # must not reach the next function
        return np.arange(len(answer), dtype=np.float64)

    def after(prompts, completions, **kwargs):
        assert len(completions) == 3
        return [1, 0.5, True]

    total, per_name = score(
        [(seen, 2.0), (after, -1.0)], ["p0", "p1", "p2"], ["a", "b", "c"], {"answer": [1, 2, 3]}
    )
    assert len(calls) == 1 and calls[0][2] == [1, 2, 3] and calls[0][3] == {}
    assert calls[0][0] == ["p0", "p1", "p2"]
    assert total.dtype == np.float32 and total.tolist() == [-1.0, 1.5, 3.0]
    assert list(per_name) == ["seen", "after"]
    assert per_name["after"].dtype == np.float32 and per_name["after"].tolist() == [1, 0.5, 1]


def _raises(prompts, completions, **kwargs):
    raise KeyError("answer")


@pytest.mark.parametrize(
    "fn,match",
    [
        (_raises, "'_raises' raised KeyError: 'answer'"),
        (_const(None, "gives_none"), "'gives_none' returned None at index 0"),
        (lambda **kw: [1.0, float("nan"), 2.0], "'<lambda>' returned nan at index 1"),
        (lambda **kw: [1.0, 2.0, -math.inf], "returned -inf at index 2; rewards must be finite"),
        (lambda **kw: [1.0, 2.0], "'<lambda>' returned 2 values for 3 completions"),
        (lambda **kw: 1.0, "returned a float; return a list of 3 floats"),
        (lambda **kw: "1.0", "returned a str"),
        (lambda **kw: [1.0, "2", 3.0], "returned '2' at index 1, which is not a number"),
    ],
)
def test_score_rejects_bad_rewards(fn, match):
    with pytest.raises(RewardError, match=match) as info:
        score([(_const(0.0, "fine"), 1.0), (fn, 1.0)], ["p"] * 3, ["c"] * 3, {})
    assert isinstance(info.value, LlmjaxError) and isinstance(info.value, ValueError)
    if fn is _raises:
        assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    "args,match",
    [
        (([(_const(1.0, "a"), 1.0)], ["p"], ["c", "d"], None), "1 prompts for 2 completions"),
        (([(_const(1.0, "a"), 1.0)], ["p"], ["c"], {"answer": [1, 2]}), "field 'answer' has 2"),
        (([(_const(1.0, "a"), 1.0)], ["p"], ["c"], {"prompts": ["x"]}), "shadow"),
        (([], ["p"], ["c"], None), "at least one"),
        (([(_const(1.0, "a"), 1.0), (_const(2.0, "a"), 1.0)], ["p"], ["c"], None), "named 'a'"),
        (([(_const(1.0, "a"), math.nan)], ["p"], ["c"], None), "weight nan"),
    ],
)
def test_score_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        score(*args)


def test_reward_metrics():
    per_name = {"acc": np.array([1, 0, 1, 1], np.float32), "one": np.array([0.25], np.float32)}
    metrics = reward_metrics(per_name)
    assert set(metrics) == {
        "rewards/acc/mean",
        "rewards/acc/std",
        "rewards/one/mean",
        "rewards/one/std",
    }
    assert metrics["rewards/acc/mean"] == 0.75
    np.testing.assert_allclose(metrics["rewards/acc/std"], 0.5, rtol=1e-12)  # unbiased
    assert metrics["rewards/one/std"] == 0.0 and metrics["rewards/one/mean"] == 0.25
