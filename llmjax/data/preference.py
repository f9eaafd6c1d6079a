"""Preference pairs for DPO-family training and reward models: TRL-format records -> paired batches.

One JSON object per line in one of TRL's preference formats (one format per file; other keys are
ignored): ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the same with lists of messages
(chosen and rejected holding the assistant's reply or replies); and with an implicit prompt,
``{"chosen": ..., "rejected": ...}`` (strings or lists of messages), the prompt being what both
sides share, cut where TRL's ``extract_prompt`` cuts it:

- messages: the longest common leading run of messages; it must not be empty, and each side must
  go on with an assistant message.
- text: up to the first character where the two differ, moved back by one when the character
  before it is a space, so that each completion starts with its space (``"The sky is blue."`` and
  ``"The sky is green."`` give ``"The sky is"``, ``" blue."``, ``" green."``). When one text is a
  prefix of the other, the cut falls before the shorter one's last character (where TRL's loop
  stops). Texts that differ from their first character share no prompt and are skipped.

Each side is tokenized as ``llmjax.data.records.tokenize_record`` tokenizes a prompt/completion
record: text as ``encode(prompt)`` and ``encode(prompt + completion)`` with special tokens, then
``eos``; messages by the chat template, the prompt with the generation prompt. A side's prompt is
what its two encodings share, so the two sides may split their ids at different points.

Truncation, per side: a prompt longer than ``max_prompt_len`` (0: ``seq_len // 2``) keeps its last
``max_prompt_len`` tokens (the end of a prompt is what the reply answers), then a completion that
does not fit keeps its first ``seq_len - len(prompt)`` tokens, at least one since
``max_prompt_len < seq_len``. The report counts the pairs with a cut prompt and those with a cut
completion (either side). Two sides with the same ids (after truncation) carry no preference: the
pair is skipped as "identical completions", like the bad records of ``llmjax.data.records``.

Batches hold one pair per row, right padded: ``tokens``, ``targets``, ``positions``,
``segment_ids`` (int32 ``[B, 2, T]``) and ``loss_mask`` (float32 ``[B, 2, T]``), index 0 of axis
1 the chosen side and 1 the rejected side, each laid out as ``llmjax.data.sft``'s unpacked rows
(slot ``j`` reads token ``j`` and predicts token ``j + 1``; ``loss_mask`` 1 where that token is a
completion token; segment 1 on real tokens, 0 on padding); and ``pair_index`` (int32 ``[B]``),
each row's index in its split's list of pairs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from llmjax.data import records as record_formats
from llmjax.data import sft
from llmjax.data.packing import Batch
from llmjax.data.records import (
    BadRecord,
    Example,
    Record,
    Skips,
    _check_messages,
    _common_prefix,
    _json_type,
    tokenize_record,
)
from llmjax.data.text import decode
from llmjax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STRINGS, CONVERSATIONAL, IMPLICIT, IMPLICIT_CONVERSATIONAL = (
    "prompt/chosen/rejected",
    "conversational prompt/chosen/rejected",
    "chosen/rejected (implicit prompt)",
    "conversational chosen/rejected (implicit prompt)",
)
_CONVERSATIONS = (CONVERSATIONAL, IMPLICIT_CONVERSATIONAL)
_KEYS = {
    STRINGS: ("prompt", "chosen", "rejected"),
    CONVERSATIONAL: ("prompt", "chosen", "rejected"),
    IMPLICIT: ("chosen", "rejected"),
    IMPLICIT_CONVERSATIONAL: ("chosen", "rejected"),
}
_LAYOUT_VERSION = 1  # bump when the same records and settings would give other batches

# Fixes that read differently for pairs than for records.py's formats, and reasons only pairs have.
_PAIR_FIXES = {
    "not a JSON object": 'write each line as a JSON object such as {"prompt": "...", "chosen": '
    '"...", "rejected": "..."}',
    "missing field": "give every record chosen and rejected, and a prompt unless both sides "
    "start with it",
    "mistyped field": "write prompt, chosen and rejected as strings, or all three as lists of "
    "messages, each message an object with string role and content",
    "empty completion": "give chosen and rejected each a completion that is not blank, or delete "
    "the record",
    "no assistant message": "give chosen and rejected each the assistant's reply",
    "no common prompt": "write the prompt both sides answer at the start of each, or give it "
    "as the record's prompt field",
    "identical completions": "give chosen and rejected different completions (within seq_len "
    "tokens), or delete the record",
}


@dataclass(frozen=True)
class PreferenceDataConfig:
    """A ``.jsonl`` file of TRL-format preference records and how it becomes batches."""

    path: str = ""
    seq_len: int = 512  # tokens of prompt + completion, for each side of a pair
    max_prompt_len: int = 0  # 0: seq_len // 2; longer prompts lose their leftmost tokens
    batch_size: int = 8  # pairs per batch
    seed: int = 0
    heldout_fraction: float = 0.05  # of distinct records; at least one is held out
    strict: bool = False  # the first bad record raises instead of being skipped and counted

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len}: must be at least 2; raise it")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be at least 1; raise it")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(
                f"data.heldout_fraction={self.heldout_fraction}: must lie strictly between 0 and "
                "1; set it to the share of records to hold out, such as 0.05"
            )
        if not 0 <= self.max_prompt_len < self.seq_len:
            raise ConfigError(
                f"data.max_prompt_len={self.max_prompt_len}: must be at least 0 (0 takes "
                f"seq_len // 2) and below data.seq_len={self.seq_len}, to leave room for the "
                "completion; lower it or raise data.seq_len"
            )

    @property
    def prompt_limit(self) -> int:
        return self.max_prompt_len or self.seq_len // 2


@dataclass(frozen=True)
class Pair:
    """One usable record after tokenization and truncation."""

    line: int  # 1-based line in the file
    prompt_ids: list[int]  # the prompt as the chosen side tokenized it
    chosen: list[int]  # the chosen side's prompt and completion
    rejected: list[int]
    chosen_prompt_len: int  # chosen[:chosen_prompt_len] is its prompt
    rejected_prompt_len: int


@dataclass(frozen=True)
class _Parsed:
    line: int
    kind: str
    prompt: str | list
    chosen: str | list
    rejected: str | list
    key: str  # identity for the held-out split: equal records land on the same side


def _kind(rec: dict) -> str | None:
    """The format a record is written in, or None when it has none of the formats' fields."""
    if "prompt" in rec:
        p, c = rec["prompt"], rec.get("chosen")
        # The prompt decides; a prompt of the wrong type falls back on the chosen side's type.
        conversational = isinstance(p, list) or (not isinstance(p, str) and isinstance(c, list))
        return CONVERSATIONAL if conversational else STRINGS
    if "chosen" in rec or "rejected" in rec:
        c, r = rec.get("chosen"), rec.get("rejected")
        conversational = isinstance(c, list) or (not isinstance(c, str) and isinstance(r, list))
        return IMPLICIT_CONVERSATIONAL if conversational else IMPLICIT
    return None


def text_prompt_end(chosen: str, rejected: str) -> int:
    """Where TRL's ``extract_prompt`` ends the prompt two texts share (the module docstring)."""
    n = min(len(chosen), len(rejected))
    for i in range(n):
        if chosen[i] != rejected[i]:
            # TRL also steps back at i == 0 onto the text's last character; no prompt is shared.
            return i - 1 if i > 0 and chosen[i - 1] == " " else i
    return n - 1


def _fields(kind: str, rec: dict) -> tuple:
    """``(prompt, chosen, rejected)`` of a record, the prompt extracted when implicit.

    Raises ``BadRecord`` for a record that cannot be used.
    """
    keys = _KEYS[kind]
    for key in keys:
        if key not in rec:
            raise BadRecord("missing field", f"a {kind} record without {key!r}")
    if kind not in _CONVERSATIONS:
        for key in keys:
            if not isinstance(rec[key], str):
                raise BadRecord(
                    "mistyped field", f"{key!r} is {_json_type(rec[key])}, not a string"
                )
        prompt, chosen, rejected = rec.get("prompt"), rec["chosen"], rec["rejected"]
        if kind == IMPLICIT and chosen.strip() and rejected.strip():
            cut = text_prompt_end(chosen, rejected)
            if cut <= 0:
                raise BadRecord("no common prompt", "chosen and rejected start with different text")
            prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadRecord("empty completion", f"the {name} completion is blank")
        return prompt, chosen, rejected
    for key in keys:
        bad = _check_messages(rec[key], repr(key))
        if bad:
            raise BadRecord(*bad)
    if kind == CONVERSATIONAL:
        if not rec["prompt"]:
            raise BadRecord("empty prompt", "the prompt holds no message")
        prompt, sides = rec["prompt"], (rec["chosen"], rec["rejected"])
    else:
        chosen, rejected = rec["chosen"], rec["rejected"]
        k = _common_prefix(chosen, rejected)
        if k == 0:
            raise BadRecord("no common prompt", "chosen and rejected start with different messages")
        if k == len(chosen) == len(rejected):
            raise BadRecord("identical completions", "chosen and rejected are the same messages")
        prompt, sides = chosen[:k], (chosen[k:], rejected[k:])
    for name, side in zip(("chosen", "rejected"), sides, strict=True):
        if not side:
            raise BadRecord("empty completion", f"{name!r} holds no message after the prompt")
        if kind == IMPLICIT_CONVERSATIONAL and side[0]["role"] != "assistant":
            raise BadRecord(
                "no assistant message",
                f"after the messages both sides share, {name!r} goes on with a "
                f"{side[0]['role']} message, not the assistant's reply",
            )
        replies = [m for m in side if m["role"] == "assistant"]
        if not replies:
            raise BadRecord("no assistant message", f"{name!r} holds no assistant message")
        if not any(m["content"].strip() for m in replies):
            raise BadRecord("empty completion", f"every assistant message of {name!r} is blank")
    return prompt, *sides


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
        kind = _kind(rec)
        if kind is None:
            keys = ", ".join(map(repr, list(rec)[:8])) or "none"
            skips.add(i, "missing field", f"no prompt, chosen or rejected field (has {keys})")
            continue
        if first is None:
            first = (kind, i)
        elif kind != first[0]:
            raise DataError(
                f"{path}:{i}: a {kind} record in a file of {first[0]} records (line {first[1]} "
                "is the first); convert the records to one format or keep each format in its "
                "own file"
            )
        try:
            prompt, chosen, rejected = _fields(kind, rec)
        except BadRecord as e:
            skips.add(i, *e.args)
            continue
        key = json.dumps({k: rec[k] for k in _KEYS[kind]}, sort_keys=True, ensure_ascii=False)
        records.append(_Parsed(i, kind, prompt, chosen, rejected, key))
    return records


def _side(rec: _Parsed, completion, name: str, tok) -> Example:
    conversational = rec.kind in _CONVERSATIONS
    kind = record_formats.CONVERSATIONAL if conversational else record_formats.PROMPT_COMPLETION
    record = Record(rec.line, kind, {"prompt": rec.prompt, "completion": completion})
    try:
        return tokenize_record(record, tok, completion_only_loss=True)
    except BadRecord as e:
        reason, detail = e.args
        raise BadRecord(reason, f"the {name} side: {detail}") from e


def _truncate(ex: Example, max_prompt: int, seq_len: int) -> tuple[list[int], int, bool, bool]:
    """``(ids, prompt length, prompt cut, completion cut)``: the module docstring's rule."""
    prompt, completion = ex.ids[: ex.prompt_len], ex.ids[ex.prompt_len :]
    prompt_cut = len(prompt) > max_prompt
    if prompt_cut:
        prompt = prompt[len(prompt) - max_prompt :]
    room = seq_len - len(prompt)
    return prompt + completion[:room], len(prompt), prompt_cut, len(completion) > room


def _pairs(config: PreferenceDataConfig, path, records, skips: Skips, tok):
    """``(record, pair)`` for every record that tokenizes into a preference, and the cut counts."""
    used: list[tuple[_Parsed, Pair]] = []
    cut_prompts = cut_completions = 0
    T, P = config.seq_len, config.prompt_limit
    for rec in records:
        try:
            chosen = _side(rec, rec.chosen, "chosen", tok)
            rejected = _side(rec, rec.rejected, "rejected", tok)
        except BadRecord as e:
            skips.add(rec.line, *e.args)
            continue
        c_ids, c_n, c_pcut, c_ccut = _truncate(chosen, P, T)
        r_ids, r_n, r_pcut, r_ccut = _truncate(rejected, P, T)
        if c_ids == r_ids:
            detail = (
                f"chosen and rejected tokenize to the same {len(c_ids)} ids"
                if chosen.ids == rejected.ids
                else f"chosen and rejected are the same once cut to seq_len={T} tokens"
            )
            skips.add(rec.line, "identical completions", detail)
            continue
        cut_prompts += c_pcut or r_pcut
        cut_completions += c_ccut or r_ccut
        used.append((rec, Pair(rec.line, c_ids[:c_n], c_ids, r_ids, c_n, r_n)))
    if not used:
        first = "; ".join(skips.first.values()) or "the file holds no record"
        raise DataError(
            f"{path}: no usable preference pair ({skips.summary(T)}; {first}); fix the records "
            "(strict=True stops at the first with its fix)"
        )
    return used, cut_prompts, cut_completions


class PreferenceRows:
    """One pair per row; ``rows(idx)`` builds the batch of pairs ``idx`` (the module docstring)."""

    def __init__(self, pairs: list[Pair], seq_len: int, pad: int):
        self.pairs, self.seq_len, self.pad = list(pairs), seq_len, pad
        sides = ([p.chosen for p in self.pairs], [p.rejected for p in self.pairs])
        # Flat arrays per side, split at offsets: a batch copies slices, not Python lists.
        self._ids = [np.asarray([t for ids in s for t in ids], np.int32) for s in sides]
        self._offsets = [
            np.concatenate([[0], np.cumsum([len(ids) for ids in s], dtype=np.int64)]) for s in sides
        ]
        self._prompt_lens = np.asarray(
            [[p.chosen_prompt_len, p.rejected_prompt_len] for p in self.pairs], np.int64
        ).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self._ids)

    @property
    def loss_tokens(self) -> int:
        lengths = np.stack([np.diff(o) for o in self._offsets], axis=1)
        # A side's first token is never a target, even when its prompt is empty.
        return int((lengths - np.maximum(self._prompt_lens, 1)).sum())

    def rows(self, idx) -> Batch:
        idx = np.asarray(idx, np.int64)
        shape = (len(idx), 2, self.seq_len)
        tokens = np.full(shape, self.pad, np.int32)
        targets = np.full(shape, self.pad, np.int32)
        positions = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.float32)
        for b, r in enumerate(idx):
            for s in (0, 1):
                lo, hi = self._offsets[s][r], self._offsets[s][r + 1]
                n, ids = hi - lo, self._ids[s]
                tokens[b, s, :n] = ids[lo:hi]
                targets[b, s, : n - 1] = ids[lo + 1 : hi]
                # Slot j learns token j + 1 when that token is past the prompt.
                loss_mask[b, s, max(self._prompt_lens[r, s] - 1, 0) : n - 1] = 1
                positions[b, s, :n] = np.arange(n)
                segment_ids[b, s, :n] = 1
        return {
            "tokens": tokens,
            "targets": targets,
            "positions": positions,
            "segment_ids": segment_ids,
            "loss_mask": loss_mask,
            "pair_index": idx.astype(np.int32),
        }


class PreferenceBatchIterator(sft.SFTBatchIterator):
    """Shuffled, resumable batches of ``PreferenceRows``; state carries the data's fingerprint."""


@dataclass
class PreferenceHeldout:
    """Held-out pairs, never trained on: ``batches`` for held-out losses and accuracies."""

    rows: PreferenceRows

    @property
    def pairs(self) -> list[Pair]:
        return self.rows.pairs

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, max_batches: int | None = None):
        """Every held-out pair in order, ``batch_size`` at a time (the last batch may be short)."""
        n = len(self.rows)
        count = -(-n // batch_size)
        for b in range(count if max_batches is None else min(count, max_batches)):
            yield self.rows.rows(np.arange(b * batch_size, min((b + 1) * batch_size, n)))


@dataclass
class PreferenceData:
    tokenizer: object
    train: PreferenceBatchIterator
    heldout: PreferenceHeldout
    train_pairs: PreferenceRows
    description: str
    report: dict
    fingerprint: str


def _fingerprint_parts(config: PreferenceDataConfig, raw: bytes, tok) -> dict:
    parts = sft._fingerprint_parts(config, raw, tok)
    parts["settings"]["layout"] = f"preference-{_LAYOUT_VERSION}"
    return parts


def build_preference_data(
    config: PreferenceDataConfig, tokenizer, model_vocab_size: int
) -> PreferenceData:
    """Read, check and tokenize ``config.path`` into pairs; split off held-out pairs.

    Raises ``DataError`` for an unreadable file, mixed formats, conversations without a chat
    template, text without an eos token, token ids beyond ``model_vocab_size``, no usable pair,
    fewer training pairs than one batch, and (``strict``) the first bad record.
    """
    path, raw = sft._read(config)
    skips = Skips(str(path), config.strict, fixes=_PAIR_FIXES)
    records = _parse(path, raw, skips)
    n_records = len(records) + skips.total
    kind = records[0].kind if records else None
    if kind in _CONVERSATIONS and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path} holds {kind} records but the tokenizer has no chat template; use a tokenizer "
            "that ships one (tokenizer_config.json's chat_template) or write the records as text"
        )
    if kind in (STRINGS, IMPLICIT) and tokenizer.eos_id is None:
        raise DataError(
            f"the tokenizer has no eos token to end each side of a {kind} pair with; use a "
            "tokenizer that defines eos_token"
        )
    used, cut_prompts, cut_completions = _pairs(config, path, records, skips, tokenizer)
    # Padding is never attended to nor learned: any valid id will do.
    pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    sides = [Example(p.line, p.chosen + p.rejected, [], None) for _, p in used]
    sft._check_vocab(sides, tokenizer, pad, model_vocab_size)

    held_keys = sft._split([rec for rec, _ in used], config.heldout_fraction)
    train_rows = PreferenceRows(
        [p for rec, p in used if rec.key not in held_keys], config.seq_len, pad
    )
    held_rows = PreferenceRows([p for rec, p in used if rec.key in held_keys], config.seq_len, pad)
    T, B = config.seq_len, config.batch_size
    if len(train_rows) < B:
        raise DataError(
            f"{path}: {len(train_rows)} training pairs ({len(held_rows)} more held out), fewer "
            f"than one batch of data.batch_size={B}; add records or lower data.batch_size"
        )
    it = PreferenceBatchIterator(
        train_rows, B, config.seed, _fingerprint_parts(config, raw, tokenizer)
    )
    report = {
        "format": kind,
        "records": n_records,
        "used": len(used),
        "train_pairs": len(train_rows),
        "heldout_pairs": len(held_rows),
        "skipped": skips.report(),
        "truncated_prompts": cut_prompts,
        "truncated_completions": cut_completions,
        "train_tokens": train_rows.num_tokens,
        "loss_tokens": train_rows.loss_tokens,
    }
    description = (
        f"{len(used):,} {kind} pairs from {path} ({len(train_rows):,} train, "
        f"{len(held_rows):,} held out); {skips.summary(T)}; {cut_prompts:,} with prompts cut to "
        f"their last {config.prompt_limit} tokens, {cut_completions:,} with completions cut to "
        f"fit {T}; {train_rows.num_tokens:,} training tokens ({train_rows.loss_tokens:,} in the "
        "loss)"
    )
    if skips.total:
        log.warning("%s: %s", path, skips.summary(T))
    return PreferenceData(
        tokenizer, it, PreferenceHeldout(held_rows), train_rows, description, report, it.fingerprint
    )
