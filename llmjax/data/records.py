"""Supervised fine-tuning records: read from a ``.jsonl`` file in TRL's formats, then tokenized.

One JSON object per line, in one of four formats (one format per file; keys other than these are
ignored):

- prompt/completion: ``{"prompt": "...", "completion": "..."}``
- conversational prompt/completion: ``{"prompt": [messages], "completion": [messages]}``
- messages: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
- text: ``{"text": "..."}``

A line that cannot be used (bad JSON, a missing or mistyped field, an empty completion, an unknown
role...) is a *bad record*: ``Skips`` counts it by reason with its line number, or raises at once in
strict mode. A line in another format than the file's first record is not a bad record but a
mistake about the whole file, so it always raises.

``tokenize_record`` turns a record into token ids and a mask of the tokens to learn, the way TRL's
``SFTTrainer`` does:

- prompt/completion: ``encode(prompt)`` and ``encode(prompt + completion)`` (special tokens
  added); the completion is what follows their common prefix, then ``eos`` if not already last.
- conversational prompt/completion: the chat template renders the prompt with the generation
  prompt and the whole conversation without; the completion is what follows the common prefix.
- messages: the chat template renders the conversation; each assistant message's tokens are those
  between ``messages[:i]`` rendered with the generation prompt and ``messages[:i + 1]``.
- text: ``encode(text)`` (special tokens added) then ``eos``; every token is learned.

With ``completion_only_loss=False`` every token of every format is learned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmjax.data.text import decode
from llmjax.errors import DataError

PROMPT_COMPLETION, CONVERSATIONAL, MESSAGES, TEXT = (
    "prompt/completion",
    "conversational prompt/completion",
    "messages",
    "text",
)
ROLES = ("system", "developer", "user", "assistant", "tool")
_SHOWN_LINES = 5  # line numbers listed per reason in a summary

# What to do about each kind of bad record; the label is how summaries name the reason.
_FIXES = {
    "invalid JSON": "write one JSON object per line",
    "not a JSON object": 'write each line as a JSON object such as {"prompt": "...", '
    '"completion": "..."}',
    "missing field": "give every record the fields of one format: prompt and completion, "
    "messages, or text",
    "mistyped field": "write prompt, completion and text as strings (or prompt and completion "
    "as lists of messages), and each message as an object with string role and content",
    "empty prompt": "give the conversation's prompt at least one message",
    "empty completion": "give the record a completion that is not blank, or delete it",
    "empty text": "give the record some text, or delete it",
    "empty conversation": "give the record at least one message, or delete it",
    "no assistant message": "add the assistant's reply, or set completion_only_loss=False to "
    "train on every token",
    "unknown role": f"use one of the roles {', '.join(ROLES)}",
    "chat template error": "write the conversation in the form the tokenizer's chat template "
    "expects (the order of roles, the fields it reads)",
    "over length": "raise data.seq_len or shorten the record",
}


@dataclass(frozen=True)
class Record:
    """One usable line: its 1-based line number, its format and the fields of that format."""

    line: int
    kind: str
    fields: dict

    @property
    def key(self) -> str:
        """Identity for the held-out split: equal records land on the same side."""
        return json.dumps(self.fields, sort_keys=True, ensure_ascii=False)


@dataclass
class Skips:
    """Bad records by reason: how many and their first line numbers; ``strict`` raises instead."""

    path: str
    strict: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)  # reason -> the first record's detail
    # reason -> fix, for other record formats (preference pairs) whose fixes read differently
    fixes: dict[str, str] = field(default_factory=dict)

    def add(self, line: int, reason: str, detail: str) -> None:
        if self.strict:
            fix = self.fixes.get(reason) or _FIXES[reason]
            raise DataError(
                f"{self.path}:{line}: {detail}; {fix} (without strict, "
                "--strict on the command line, such records are skipped and counted)"
            )
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, f"line {line}: {detail}")
        shown = self.lines.setdefault(reason, [])
        if len(shown) < _SHOWN_LINES:
            shown.append(line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def report(self) -> dict:
        return {r: {"count": n, "lines": list(self.lines[r])} for r, n in self.counts.items()}

    def summary(self, seq_len: int) -> str:
        """``"3 records skipped: 2 over 512 tokens (lines 14, 90), 1 empty completion (line 7)"``."""
        if not self.counts:
            return "no records skipped"
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]):
            label = f"over {seq_len} tokens" if reason == "over length" else reason
            shown = self.lines[reason]
            where = ", ".join(map(str, shown)) + (", ..." if n > len(shown) else "")
            parts.append(f"{n} {label} (line{'s' if n > 1 else ''} {where})")
        total = self.total
        return f"{total} record{'s' if total > 1 else ''} skipped: " + ", ".join(parts)


def _json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), "null")


def _kind(rec: dict) -> str | None:
    """The format a record is written in, or None when it has none of the formats' fields."""
    if "prompt" in rec or "completion" in rec:
        p, c = rec.get("prompt"), rec.get("completion")
        # The prompt decides; a prompt of the wrong type falls back on the completion's type.
        if isinstance(p, list) or (not isinstance(p, str) and isinstance(c, list)):
            return CONVERSATIONAL
        return PROMPT_COMPLETION
    if "messages" in rec:
        return MESSAGES
    if "text" in rec:
        return TEXT
    return None


def _check_messages(messages, name: str) -> tuple[str, str] | None:
    """``(reason, detail)`` for a malformed list of messages, else None."""
    if not isinstance(messages, list):
        return "mistyped field", f"{name} is {_json_type(messages)}, not a list of messages"
    for i, m in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            return "mistyped field", f"{where} is {_json_type(m)}, not an object"
        for key in ("role", "content"):
            if key not in m:
                return "missing field", f"{where} has no {key!r}"
            if not isinstance(m[key], str):
                return "mistyped field", f"{where}.{key} is {_json_type(m[key])}, not a string"
        if m["role"] not in ROLES:
            return "unknown role", f"{where} has the unknown role {m['role']!r}"
    return None


def _problem(kind: str, rec: dict, completion_only_loss: bool) -> tuple[str, str] | None:
    """``(reason, detail)`` when a record of format ``kind`` cannot be used, else None."""
    if kind == PROMPT_COMPLETION:
        for key in ("prompt", "completion"):
            if key not in rec:
                return "missing field", f"a prompt/completion record without {key!r}"
            if not isinstance(rec[key], str):
                return "mistyped field", f"{key!r} is {_json_type(rec[key])}, not a string"
        if not rec["completion"].strip():
            return "empty completion", "the completion is blank"
        return None
    if kind == CONVERSATIONAL:
        for key in ("prompt", "completion"):
            if key not in rec:
                return "missing field", f"a conversational record without {key!r}"
            bad = _check_messages(rec[key], repr(key))
            if bad:
                return bad
        if not rec["prompt"]:
            return "empty prompt", "the prompt holds no message"
        if not rec["completion"]:
            return "empty completion", "the completion holds no message"
        replies = [m for m in rec["completion"] if m["role"] == "assistant"]
        if not replies:
            return "no assistant message", "the completion holds no assistant message"
        if not any(m["content"].strip() for m in replies):
            return "empty completion", "every assistant message of the completion is blank"
        return None
    if kind == MESSAGES:
        bad = _check_messages(rec["messages"], "'messages'")
        if bad:
            return bad
        if not rec["messages"]:
            return "empty conversation", "'messages' is empty"
        replies = [m for m in rec["messages"] if m["role"] == "assistant"]
        if completion_only_loss and not replies:
            return "no assistant message", "the conversation holds no assistant message to learn"
        if completion_only_loss and not any(m["content"].strip() for m in replies):
            return "empty completion", "every assistant message is blank"
        return None
    text = rec["text"]
    if not isinstance(text, str):
        return "mistyped field", f"'text' is {_json_type(text)}, not a string"
    if not text.strip():
        return "empty text", "'text' is blank"
    return None


_FIELDS = {
    PROMPT_COMPLETION: ("prompt", "completion"),
    CONVERSATIONAL: ("prompt", "completion"),
    MESSAGES: ("messages",),
    TEXT: ("text",),
}


def parse_records(
    path: Path, raw: bytes, skips: Skips, completion_only_loss: bool = True
) -> list[Record]:
    """The usable records of the ``.jsonl`` file ``path`` (bytes ``raw``); bad ones go to ``skips``.

    Raises ``DataError`` when a record's format differs from the first record's.
    """
    text = decode(path, raw)
    records: list[Record] = []
    first: tuple[str, int] | None = None  # the file's format and where it was seen first
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skips.add(i, "invalid JSON", f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(rec, dict):
            skips.add(i, "not a JSON object", f"{_json_type(rec)} where a JSON object belongs")
            continue
        kind = _kind(rec)
        if kind is None:
            keys = ", ".join(map(repr, list(rec)[:8])) or "none"
            skips.add(
                i, "missing field", f"no prompt/completion, messages or text field (has {keys})"
            )
            continue
        if first is None:
            first = (kind, i)
        elif kind != first[0]:
            raise DataError(
                f"{path}:{i}: a {kind} record in a file of {first[0]} records (line {first[1]} "
                "is the first); convert the records to one format or keep each format in its "
                "own file"
            )
        bad = _problem(kind, rec, completion_only_loss)
        if bad:
            skips.add(i, *bad)
            continue
        records.append(Record(i, kind, {k: rec[k] for k in _FIELDS[kind]}))
    return records


@dataclass
class Example:
    """A tokenized record: its ids and, per id, whether it is learned as a target."""

    line: int
    ids: list[int]
    learn: list[int]  # 1 where the token is a loss target
    prompt_len: int | None  # prompt/completion formats: ids[:prompt_len] is the prompt


class BadRecord(Exception):
    """A record that cannot be tokenized into a usable example: ``(reason, detail)``."""


class Refused(Exception):
    """A record that shows the whole file cannot be used as configured (problem; fix)."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _render(tok, messages, generation_prompt: bool) -> list[int]:
    try:
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True
        )
    except DataError as e:
        raise BadRecord("chat template error", str(e).split(";")[0]) from e
    return list(ids)


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def tokenize_record(rec: Record, tok, completion_only_loss: bool) -> Example:
    """``rec`` as ids and learn flags (see the module docstring).

    Raises ``BadRecord`` for a record that yields nothing to learn or that the chat template
    refuses, ``Refused`` when the template cannot locate the assistant's tokens at all.
    """
    f, kind = rec.fields, rec.kind
    if kind == TEXT:
        ids = _with_eos(list(tok.encode(f["text"], add_special_tokens=True)), tok.eos_id)
        return Example(rec.line, ids, [1] * len(ids), None)
    if kind == MESSAGES:
        return _tokenize_messages(rec, tok, completion_only_loss)
    if kind == PROMPT_COMPLETION:
        prompt = list(tok.encode(f["prompt"], add_special_tokens=True))
        full = tok.encode(f["prompt"] + f["completion"], add_special_tokens=True)
        ids = _with_eos(list(full), tok.eos_id)
    else:
        prompt = _render(tok, f["prompt"], True)
        ids = _render(tok, f["prompt"] + f["completion"], False)
    # Where the two diverge, not len(prompt): tokens can merge across the boundary, and some
    # templates render a prompt alone differently from one followed by a reply.
    n = _common_prefix(prompt, ids)
    if len(ids) <= max(n, 1):  # an example's first token is never a target
        raise BadRecord("empty completion", "the completion adds no token after the prompt")
    learn = [0] * n + [1] * (len(ids) - n) if completion_only_loss else [1] * len(ids)
    return Example(rec.line, ids, learn, n)


def _tokenize_messages(rec: Record, tok, completion_only_loss: bool) -> Example:
    messages = rec.fields["messages"]
    ids = _render(tok, messages, False)
    if not completion_only_loss:
        return Example(rec.line, ids, [1] * len(ids), None)
    learn = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            raise Refused(
                "the chat template does not render the "
                f"conversation's first {i + 1} messages as the start of the whole, so the "
                "assistant's tokens cannot be found; use a template that renders each turn the "
                "same way whatever follows, write the records as prompt/completion, or set "
                "completion_only_loss=False"
            )
        learn[len(before) : len(upto)] = [1] * (len(upto) - len(before))
    if not any(learn[1:]):
        raise BadRecord("empty completion", "the assistant messages render to no token")
    return Example(rec.line, ids, learn, None)


def heldout_pair(rec: Record, ex: Example, tok) -> tuple[list[int], list[int]] | None:
    """``(prompt ids, completion ids)`` for generating the record's answer; None for text."""
    if ex.prompt_len is not None:
        return ex.ids[: ex.prompt_len], ex.ids[ex.prompt_len :]
    if rec.kind != MESSAGES:
        return None
    messages = rec.fields["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    try:
        before = _render(tok, messages[:last], True)
        upto = _render(tok, messages[: last + 1], False)
    except BadRecord:
        return None
    return before, upto[_common_prefix(before, upto) :]
