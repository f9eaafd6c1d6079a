"""Prompts for reinforcement learning (GRPO, PPO): TRL-format records -> fixed-width prompt batches.

One JSON object per line with a ``"prompt"``: a string, tokenized as ``encode(prompt)`` with special
tokens, or a list of messages, rendered by the chat template with the generation prompt (as
``llmjax.data.records`` renders a conversational prompt). One of the two per file. Every other key
of a record is a *field*: its JSON value reaches the reward functions by that name (TRL's
convention, ``reward(prompts, completions, answer=[...])``), through ``PromptData.fields_of``.

A prompt longer than ``max_prompt_len`` keeps its last ``max_prompt_len`` tokens (the end of a
prompt is what the reply answers); the report counts them. ``Prompt.text``, what reward functions
read as the prompt, is the whole prompt as written (for messages, the chat template's text).

Held out: a fixed hash of each distinct prompt picks ``heldout_fraction`` of them (at least one),
whatever the seed; records that repeat a prompt (with other fields or not) land on its side, so no
held-out question is ever trained on.

Batches hold one prompt per row, right padded with the pad id (``pad_id``, else ``eos_id``, else
0) to ``PromptData.width``, the longest prompt of both splits, so that every batch has one shape:
``tokens`` (int32 ``[B, L]``), ``lengths`` (int32 ``[B]``, at least 1) and ``index`` (int32
``[B]``, each row's index in its split's list of prompts).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from llmjax.data import sft
from llmjax.data.packing import Batch
from llmjax.data.records import BadRecord, Example, Skips, _check_messages, _json_type, _render
from llmjax.data.text import decode
from llmjax.errors import ConfigError, DataError, InputError

log = logging.getLogger(__name__)

TEXT, CONVERSATIONAL = "prompt", "conversational prompt"
SPLITS = ("train", "heldout")
_LAYOUT_VERSION = 1  # bump when the same records and settings would give other batches

# Fixes that read differently for prompt records than for records.py's formats.
_PROMPT_FIXES = {
    "not a JSON object": 'write each line as a JSON object such as {"prompt": "...", '
    '"answer": "..."}',
    "missing field": "give every record a prompt: a string, or a list of messages each with a "
    "role and a content",
    "mistyped field": "write the prompt as a string or as a list of messages, each message an "
    "object with string role and content",
    "empty prompt": "give the record a prompt that is not blank, or delete it",
}


@dataclass(frozen=True)
class PromptDataConfig:
    """A ``.jsonl`` file of prompts (and the fields reward functions read) and its batches."""

    path: str = ""
    max_prompt_len: int = 256  # longer prompts keep their last max_prompt_len tokens
    batch_size: int = 8  # prompts per step
    seed: int = 0
    heldout_fraction: float = 0.05  # of distinct prompts; at least one is held out
    strict: bool = False  # the first bad record raises instead of being skipped and counted

    def __post_init__(self):
        if self.max_prompt_len < 1:
            raise ConfigError(
                f"data.max_prompt_len={self.max_prompt_len}: must be at least 1; set it to the "
                "most prompt tokens to keep, such as 256"
            )
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be at least 1; raise it")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(
                f"data.heldout_fraction={self.heldout_fraction}: must lie strictly between 0 and "
                "1; set it to the share of prompts to hold out, such as 0.05"
            )


@dataclass(frozen=True)
class Prompt:
    """One usable record after tokenization and truncation."""

    line: int  # 1-based line in the file
    ids: list[int]  # after truncation
    text: str  # the whole prompt: the string, or the chat template's rendering of the messages
    fields: dict  # every other key of the record, with its JSON value


@dataclass(frozen=True)
class _Parsed:
    line: int
    kind: str
    prompt: str | list
    fields: dict
    key: str  # identity for the held-out split: equal prompts land on the same side


def _problem(prompt) -> tuple[str, str] | None:
    """``(reason, detail)`` when a record's prompt cannot be used, else None."""
    if isinstance(prompt, str):
        return None if prompt.strip() else ("empty prompt", "the prompt is blank")
    if not isinstance(prompt, list):
        return "mistyped field", f"'prompt' is {_json_type(prompt)}, not a string or messages"
    bad = _check_messages(prompt, "'prompt'")
    if bad:
        return bad
    if not prompt:
        return "empty prompt", "the prompt holds no message"
    if not any(m["content"].strip() for m in prompt):
        return "empty prompt", "every message of the prompt is blank"
    return None


def _parse(path, raw: bytes, skips: Skips) -> list[_Parsed]:
    """The usable records of the file; bad ones go to ``skips``; mixed formats raise."""
    records: list[_Parsed] = []
    first: tuple[str, int] | None = None  # the file's format and where it was seen first
    for i, line in enumerate(decode(path, raw).splitlines(), start=1):
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
        if "prompt" not in rec:
            keys = ", ".join(map(repr, list(rec)[:8])) or "none"
            skips.add(i, "missing field", f"no prompt field (has {keys})")
            continue
        prompt = rec["prompt"]
        bad = _problem(prompt)
        if bad:
            skips.add(i, *bad)
            continue
        kind = CONVERSATIONAL if isinstance(prompt, list) else TEXT
        if first is None:
            first = (kind, i)
        elif kind != first[0]:
            raise DataError(
                f"{path}:{i}: a {kind} record in a file of {first[0]} records (line {first[1]} "
                "is the first); write every prompt as a string or every prompt as messages"
            )
        fields = {k: v for k, v in rec.items() if k != "prompt"}
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        records.append(_Parsed(i, kind, prompt, fields, key))
    return records


def _tokenize(rec: _Parsed, tok) -> tuple[list[int], str]:
    """``(ids, text)`` of a record's whole prompt; raises ``BadRecord``."""
    if rec.kind == TEXT:
        ids, text = list(tok.encode(rec.prompt, add_special_tokens=True)), rec.prompt
    else:
        try:
            text = tok.apply_chat_template(rec.prompt, add_generation_prompt=True, tokenize=False)
        except DataError as e:
            raise BadRecord("chat template error", str(e).split(";")[0]) from e
        ids = _render(tok, rec.prompt, True)
    if not ids:
        raise BadRecord("empty prompt", "the prompt tokenizes to no token")
    return ids, text


def _prompts(config: PromptDataConfig, path, records, skips: Skips, tok):
    """``(record, prompt)`` for every record that tokenizes, and how many were cut."""
    used: list[tuple[_Parsed, Prompt]] = []
    cut = 0
    P = config.max_prompt_len
    for rec in records:
        try:
            ids, text = _tokenize(rec, tok)
        except BadRecord as e:
            skips.add(rec.line, *e.args)
            continue
        cut += len(ids) > P
        used.append((rec, Prompt(rec.line, ids[-P:], text, rec.fields)))
    if not used:
        first = "; ".join(skips.first.values()) or "the file holds no record"
        raise DataError(
            f"{path}: no usable prompt ({skips.summary(P)}; {first}); fix the records "
            "(strict=True stops at the first with its fix)"
        )
    return used, cut


def _split(path, records: list[_Parsed], fraction: float) -> set[str]:
    """The keys of held-out prompts: a fixed hash of each distinct prompt, never the seed."""
    keys = sorted({r.key for r in records}, key=lambda k: hashlib.sha256(k.encode()).digest())
    if len(keys) < 2:
        raise DataError(
            f"{path}: only {len(keys)} distinct usable prompt; training needs at least two, one "
            "of them held out for evaluation; add records"
        )
    return set(keys[: min(max(1, round(fraction * len(keys))), len(keys) - 1)])


class PromptRows:
    """One prompt per row; ``rows(idx)`` builds the batch of prompts ``idx`` (the module docstring)."""

    def __init__(self, prompts: list[Prompt], width: int, pad: int):
        self.prompts, self.width, self.pad = list(prompts), width, pad
        # One flat array split at offsets: a batch copies slices, not Python lists.
        self._ids = np.asarray([t for p in self.prompts for t in p.ids], np.int32)
        self._lengths = np.asarray([len(p.ids) for p in self.prompts], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def rows(self, idx) -> Batch:
        idx = np.asarray(idx, np.int64)
        tokens = np.full((len(idx), self.width), self.pad, np.int32)
        for b, r in enumerate(idx):
            lo, hi = self._offsets[r], self._offsets[r + 1]
            tokens[b, : hi - lo] = self._ids[lo:hi]
        return {
            "tokens": tokens,
            "lengths": self._lengths[idx].astype(np.int32),
            "index": idx.astype(np.int32),
        }


class PromptBatchIterator(sft.SFTBatchIterator):
    """Shuffled, resumable batches of ``PromptRows``; state carries the data's fingerprint."""


@dataclass
class PromptData:
    tokenizer: object
    train: PromptBatchIterator
    train_prompts: PromptRows
    heldout: list[Prompt]
    width: int  # L of every batch: the longest prompt of both splits
    description: str
    report: dict
    fingerprint: str
    heldout_prompts: PromptRows  # the held-out prompts as rows of the same width
    # The fields of every usable record, in order of first appearance.
    field_names: tuple[str, ...] = ()

    def heldout_batches(self, batch_size: int, max_batches: int | None = None):
        """Every held-out prompt in order, ``batch_size`` at a time (the last batch may be short)."""
        n = len(self.heldout_prompts)
        count = -(-n // batch_size)
        for b in range(count if max_batches is None else min(count, max_batches)):
            yield self.heldout_prompts.rows(np.arange(b * batch_size, min((b + 1) * batch_size, n)))

    def fields_of(self, split: str, index) -> dict[str, list]:
        """``{name: [value per prompt]}`` of the prompts ``index`` of ``split`` (a batch's index).

        Every field of the file is a key, in every call, so that a reward function reading one
        finds it whatever the batch; a record without it gives None. Values are copies: a reward
        function that edits one leaves the data as it was.
        """
        if split not in SPLITS:
            raise InputError(f"split={split!r} is unknown; use one of {SPLITS}")
        prompts = self.train_prompts.prompts if split == "train" else self.heldout
        chosen = [prompts[int(i)] for i in np.asarray(index).reshape(-1)]
        return {
            name: [copy.deepcopy(p.fields.get(name)) for p in chosen] for name in self.field_names
        }


def _fingerprint_parts(config: PromptDataConfig, raw: bytes, tok) -> dict:
    parts = sft._fingerprint_parts(config, raw, tok)
    parts["settings"]["layout"] = f"prompts-{_LAYOUT_VERSION}"
    return parts


def build_prompt_data(config: PromptDataConfig, tokenizer, model_vocab_size: int) -> PromptData:
    """Read, check and tokenize ``config.path`` into prompts; split off held-out prompts.

    Raises ``DataError`` for an unreadable file, mixed formats, conversations without a chat
    template, token ids beyond ``model_vocab_size``, no usable prompt, fewer than two distinct
    prompts, fewer training prompts than one batch, and (``strict``) the first bad record.
    """
    path, raw = sft._read(config)
    skips = Skips(str(path), config.strict, fixes=_PROMPT_FIXES)
    records = _parse(path, raw, skips)
    n_records = len(records) + skips.total
    kind = records[0].kind if records else None
    if kind == CONVERSATIONAL and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path} holds {kind} records but the tokenizer has no chat template; use a tokenizer "
            "that ships one (tokenizer_config.json's chat_template) or write the prompts as text"
        )
    used, cut = _prompts(config, path, records, skips, tokenizer)
    # Padding is never attended to: any valid id will do.
    pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    sft._check_vocab(
        [Example(p.line, p.ids, [], None) for _, p in used], tokenizer, pad, model_vocab_size
    )

    held_keys = _split(path, [rec for rec, _ in used], config.heldout_fraction)
    width = max(len(p.ids) for _, p in used)
    train = PromptRows([p for rec, p in used if rec.key not in held_keys], width, pad)
    held = PromptRows([p for rec, p in used if rec.key in held_keys], width, pad)
    B, P = config.batch_size, config.max_prompt_len
    if len(train) < B:
        raise DataError(
            f"{path}: {len(train)} training prompts ({len(held)} more held out), fewer than one "
            f"batch of data.batch_size={B}; add records or lower data.batch_size"
        )
    names = tuple(dict.fromkeys(k for rec, _ in used for k in rec.fields))
    it = PromptBatchIterator(train, B, config.seed, _fingerprint_parts(config, raw, tokenizer))
    lengths = [len(p.ids) for _, p in used]
    report = {
        "format": kind,
        "records": n_records,
        "used": len(used),
        "train_prompts": len(train),
        "heldout_prompts": len(held),
        "skipped": skips.report(),
        "truncated_prompts": cut,
        "fields": list(names),
        "width": width,
        "min_length": min(lengths),
        "mean_length": round(float(np.mean(lengths)), 2),
        "train_tokens": train.num_tokens,
    }
    shown = ", ".join(names) if names else "none"
    description = (
        f"{len(used):,} {kind}s from {path} ({len(train):,} train, {len(held):,} held out; fields: "
        f"{shown}); {skips.summary(P)}; {cut:,} cut to their last {P} tokens; lengths "
        f"{min(lengths)}-{width} tokens (mean {np.mean(lengths):.1f}), batches of {B} x {width}"
    )
    if skips.total:
        log.warning("%s: %s", path, skips.summary(P))
    return PromptData(
        tokenizer,
        it,
        train,
        held.prompts,
        width,
        description,
        report,
        it.fingerprint,
        held,
        names,
    )
