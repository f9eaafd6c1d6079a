"""Reward functions on decoded text for reinforcement learning on verifiable rewards.

TRL's convention: a reward function is called once per batch as ``fn(prompts=..., completions=...,
**fields)``, with ``N`` prompt and completion strings and ``fields`` the data set's other columns
as lists of ``N`` values (``answer=[...]``), and returns ``N`` floats. Its ``__name__`` names its
metrics (``rewards/<name>/mean``); a function should take ``**kwargs`` to ignore the fields it does
not read. ``score`` runs several weighted functions and checks what they return.

Built-ins (``BUILTINS``, each a factory): ``answer_match`` (the final answer equals a column),
``format_match`` (a regular expression) and ``length_penalty`` (DAPO's soft overlong penalty).
``load_reward`` resolves ``"NAME"`` or ``"module:function"`` specs, as a command line passes them;
``model_reward`` makes a trained reward model one.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np

from llmjax.errors import ConfigError, InputError, RewardError, UnknownName

EXTRACTS = ("last_number", "answer_tag")
LENGTH_UNITS = ("chars", "tokens")
# DeepSeek-R1's output format: reasoning in <think>, then the answer in <answer>.
R1_FORMAT = r"<think>.*?</think>\s*<answer>.*?</answer>"

# A number in running text: optional sign, digits with optional thousands commas ("1,000" is
# 1000, but "1,2" is the two numbers 1 and 2), optional decimals (".5" too). Not inside a word or
# after a dot ("x2", "v1.2.3" give no stray numbers); "3-5" is 3 and 5, not 3 and -5. Fractions
# and exponents are not evaluated ("1/2" is 1 and 2).
_NUMBER = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_IN_TEXT = re.compile(r"(?<![\w.])" + _NUMBER, re.ASCII)
_WHOLE_NUMBER = re.compile(_NUMBER, re.ASCII)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_match(
    field: str = "answer", extract: str = "last_number", *, name: str = "answer_match"
):
    """1.0 where a completion's final answer equals the ``field`` column's value, else 0.0.

    ``extract`` finds the final answer: ``"last_number"`` the last number in the completion (a
    sign, thousands commas as in ``"1,000"``, decimals; fractions and exponents are not evaluated,
    so ``"1/2"`` ends in 2), ``"answer_tag"`` the text of the last ``<answer>...</answer>`` (no
    tag, or an unclosed one, scores 0.0). The expected value is a number or a string. Two numbers
    compare by value (``"1,000"``, ``"1000.0"`` and ``1000`` are equal; ``"-0.5"`` equals
    ``-.5``); anything else compares as text with surrounding whitespace stripped. Pre-process
    answers that hold more than the value (GSM8K's ``"... #### 72"`` to ``"72"``). A missing
    column or a ``None`` value raises.
    """
    if extract not in EXTRACTS:
        raise ValueError(f"extract={extract!r} is unknown; use one of {EXTRACTS}")
    finder = _NUMBER_IN_TEXT if extract == "last_number" else _ANSWER_TAG

    def reward(prompts, completions, **fields):
        answers = _column(fields, field, name)
        scores = []
        for i, (completion, answer) in enumerate(zip(completions, answers, strict=True)):
            if answer is None:
                raise ValueError(f"column {field!r} is None at index {i}; give every row an answer")
            found = finder.findall(completion)
            scores.append(float(bool(found) and _same_answer(found[-1], answer)))
        return scores

    return _named(reward, name)


def format_match(pattern: str = R1_FORMAT, *, search: bool = False, name: str = "format_match"):
    """1.0 where a completion has the format ``pattern`` describes, else 0.0.

    By default the whole completion, surrounding whitespace stripped, must match
    (``re.fullmatch``); ``search=True`` accepts a match anywhere (``re.search``). ``.`` matches
    newlines too (``re.DOTALL``). The default is DeepSeek-R1's ``<think>...</think><answer>...
    </answer>``; when the prompt already ends with ``<think>``, pass a pattern without it.
    """
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ValueError(f"pattern={pattern!r} is not a regular expression: {e}") from e

    def reward(prompts, completions, **fields):
        if search:
            return [float(regex.search(c) is not None) for c in completions]
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]

    return _named(reward, name)


def length_penalty(
    max_length: int = 4000,
    *,
    buffer: int | None = None,
    unit: str = "chars",
    name: str = "length_penalty",
):
    """DAPO's soft overlong penalty: 0 up to ``max_length - buffer``, then falling linearly to -1
    at ``max_length``, and -1 beyond.

    With ``L`` the completion's length and ``s = max_length - buffer``: ``0`` for ``L <= s``,
    ``-(L - s) / buffer`` for ``s < L <= max_length``, ``-1`` for ``L > max_length``. Added to a
    correctness reward it discourages rambling without punishing the completions that merely come
    close to the limit. ``unit="chars"`` counts characters of the text; ``unit="tokens"`` counts
    the ids of the ``completion_ids`` field (pass it to ``score``), and suits a ``max_length``
    equal to the generation's ``max_new_tokens``. ``buffer`` defaults to ``max_length // 4``
    and lies in ``[1, max_length]``.
    """
    if unit not in LENGTH_UNITS:
        raise ValueError(f"unit={unit!r} is unknown; use one of {LENGTH_UNITS}")
    if not (isinstance(max_length, int) and max_length >= 1):
        raise ValueError(f"max_length={max_length!r} must be a positive int")
    buffer = max(max_length // 4, 1) if buffer is None else buffer
    if not (isinstance(buffer, int) and 1 <= buffer <= max_length):
        raise ValueError(f"buffer={buffer!r} must be an int in [1, max_length={max_length}]")
    start = max_length - buffer

    def reward(prompts, completions, **fields):
        if unit == "chars":
            lengths = [len(c) for c in completions]
        else:
            lengths = [len(ids) for ids in _column(fields, "completion_ids", name)]
        # 0.0 - x rather than -x: a completion within the limit scores +0.0, not -0.0.
        return [0.0 - min(max(n - start, 0) / buffer, 1.0) for n in lengths]

    return _named(reward, name)


def model_reward(reward_model, *, name: str = "reward_model") -> Callable:
    """A trained reward model (``llmjax.inference.RewardModel``, or a run or Hugging Face
    directory for ``llmjax.load_reward_model``) as a reward function: it scores the token ids
    ``prompt_ids + completion_ids`` (fields the RL recipes pass; the completion's stop token
    included, as the model was trained on completions that end with it), not the text."""
    from llmjax.inference.reward import RewardModel, load_reward_model

    rm = reward_model if isinstance(reward_model, RewardModel) else load_reward_model(reward_model)

    def fn(prompts, completions, prompt_ids=None, completion_ids=None, **fields):
        if prompt_ids is None or completion_ids is None:
            raise InputError(
                f"reward {name!r} scores token ids: pass the prompt_ids and completion_ids fields "
                "(llmjax grpo and ppo pass them)"
            )
        sequences = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        return [float(x) for x in rm.score(sequences)]

    fn.reward_model = rm
    return _named(fn, name)


BUILTINS: dict[str, Callable[..., Callable]] = {
    "answer_match": answer_match,
    "format_match": format_match,
    "length_penalty": length_penalty,
}


def load_reward(spec: str) -> Callable:
    """The reward function ``spec`` names: a built-in's name (``"answer_match"``, made with its
    defaults) or ``"module:function"``, where ``module`` is an importable dotted name or a path to
    a ``.py`` file and ``function`` an attribute of it (dots reach nested ones)."""
    if spec in BUILTINS:
        return BUILTINS[spec]()
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UnknownName(
            f"unknown reward {spec!r}; use a built-in ({', '.join(BUILTINS)}) or 'module:function'"
        )
    obj = _import(module_name, spec)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownName(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def reward_name(fn: Callable) -> str:
    """The name a reward function's metrics go under: its ``__name__``, else its class's."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def score(
    rewards: Sequence[tuple[Callable, float]],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence] | None = None,
):
    """Scores ``N`` completions: ``(total_N, per_name)``.

    Calls each ``(function, weight)`` of ``rewards`` once on the whole batch, keyword arguments
    only (``prompts=``, ``completions=``, then ``fields``' columns). ``total_N`` is the float32
    weighted sum, ``per_name`` each function's unweighted float32 rewards by ``reward_name``. A
    function that raises, returns other than ``N`` values, or returns a value that is not a finite
    number (``None`` and NaN included) stops scoring with ``RewardError``, which names the
    function, the problem and the first bad index.
    """
    n = len(completions)
    if len(prompts) != n:
        raise InputError(f"{len(prompts)} prompts for {n} completions; pass one prompt each")
    fields = dict(fields or {})
    for key, column in fields.items():
        if key in ("prompts", "completions"):
            raise InputError(f"field {key!r} would shadow the {key} argument; rename the column")
        if len(column) != n:
            raise InputError(f"field {key!r} has {len(column)} values for {n} completions")
    if not rewards:
        raise InputError("rewards is empty; pass at least one (function, weight) pair")
    total = np.zeros(n, np.float64)
    per_name: dict[str, np.ndarray] = {}
    for fn, weight in rewards:
        name = reward_name(fn)
        if name in per_name:
            raise InputError(
                f"two reward functions are named {name!r}; their metrics would collide, so give "
                "one another name (the built-ins take name=)"
            )
        if not (isinstance(weight, numbers.Real) and math.isfinite(weight)):
            raise InputError(f"reward {name!r} has weight {weight!r}; pass a finite number")
        # Copies, so a function that edits its arguments cannot change what the next one sees.
        try:
            out = fn(
                prompts=list(prompts),
                completions=list(completions),
                **{k: list(v) for k, v in fields.items()},
            )
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}") from e
        values = _checked(name, out, n)
        per_name[name] = values.astype(np.float32)
        total += weight * values
    return total.astype(np.float32), per_name


def reward_metrics(per_name: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``rewards/<name>/std`` (unbiased; 0 for one value) of each
    function's rewards, TRL's names."""
    metrics = {}
    for name, values in per_name.items():
        values = np.asarray(values, np.float64)
        metrics[f"rewards/{name}/mean"] = float(values.mean())
        metrics[f"rewards/{name}/std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return metrics


def _named(fn, name):
    fn.__name__ = fn.__qualname__ = name
    return fn


def _column(fields, field, name):
    if field not in fields:
        raise ValueError(
            f"{name} reads the column {field!r}, which the batch lacks (it has "
            f"{sorted(fields) or 'no columns'}); pass it among the fields"
        )
    return fields[field]


def _number(value) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return Decimal(int(value))
    if isinstance(value, numbers.Real):
        return Decimal(repr(float(value))) if math.isfinite(value) else None
    text = str(value).strip()
    if not _WHOLE_NUMBER.fullmatch(text):
        return None
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _same_answer(got: str, expected) -> bool:
    a, b = _number(got), _number(expected)
    if a is not None and b is not None:
        return a == b
    return got.strip() == str(expected).strip()


def _checked(name, out, n):
    if isinstance(out, str | bytes | Mapping) or not hasattr(out, "__len__"):
        raise RewardError(
            f"reward function {name!r} returned a {type(out).__name__}; return a list of {n} floats"
        )
    if len(out) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(out)} values for {n} completions"
        )
    values = np.empty(n, np.float64)
    for i, v in enumerate(out):
        if v is None:
            raise RewardError(
                f"reward function {name!r} returned None at index {i}; every completion needs a "
                "number (return 0.0 where the reward does not apply)"
            )
        try:
            if isinstance(v, str | bytes):
                raise TypeError
            values[i] = float(v)
        except (TypeError, ValueError):
            raise RewardError(
                f"reward function {name!r} returned {v!r} at index {i}, which is not a number"
            ) from None
        if not math.isfinite(values[i]):
            raise RewardError(
                f"reward function {name!r} returned {values[i]} at index {i}; rewards must be finite"
            )
    return values


def _import(module_name, spec):
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UnknownName(f"reward {spec!r}: no file {module_name}")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except UnknownName:
        raise
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UnknownName(
                f"reward {spec!r}: no module named {module_name!r}; make it importable (install "
                "it or add its directory to PYTHONPATH) or give the path of its .py file"
            ) from e
        raise ConfigError(f"reward {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ConfigError(
            f"reward {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
