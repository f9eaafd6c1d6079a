"""Supervised fine-tuning data: TRL-format records -> token ids with loss masks -> packed batches.

Records are read, checked and tokenized by ``llmjax.data.records`` (TRL's rules).

An example of ``L`` tokens takes ``L`` slots of a row: slot ``j`` reads token ``j`` and predicts
token ``j + 1``, with ``loss_mask`` 1 when that token is learned (a completion or assistant token,
or any token with ``completion_only_loss=False``). Its last slot predicts nothing, so a loss
target never crosses into the next example of a packed row. Rows hold one example each, right
padded, or several packed best-fit decreasing; ``segment_ids`` (1.. per example, 0 for padding)
keep attention inside each example and ``positions`` restart at 0 for each.

Batches have the pretraining batch's keys (``llmjax.data.packing``): ``tokens``, ``targets``,
``positions``, ``segment_ids`` (int32 ``[B, T]``) and ``loss_mask`` (float32 ``[B, T]``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llmjax.data.packing import Batch, BatchIterator
from llmjax.data.records import (
    CONVERSATIONAL,
    MESSAGES,
    PROMPT_COMPLETION,
    TEXT,
    BadRecord,
    Example,
    Record,
    Refused,
    Skips,
    heldout_pair,
    parse_records,
    tokenize_record,
)
from llmjax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

_LAYOUT_VERSION = 1  # bump when the same records and settings would give other batches


@dataclass(frozen=True)
class SFTDataConfig:
    """A ``.jsonl`` file of TRL-format records and how it becomes batches."""

    path: str = ""
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    heldout_fraction: float = 0.05  # of distinct records; at least one is held out
    packing: bool = True  # several examples per row; False: one per row, right padded
    completion_only_loss: bool = True  # False: learn every token, prompts included
    strict: bool = False  # the first bad record raises instead of being skipped and counted

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len}: must be at least 2")
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size={self.batch_size}: must be at least 1")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError(
                f"data.heldout_fraction={self.heldout_fraction}: must lie strictly between 0 and 1"
            )


class SFTRows:
    """Rows of examples; ``rows(idx)`` builds the batch of rows ``idx``.

    Examples live in flat arrays (``ids``, ``learn``, split at ``offsets``); row ``r`` holds the
    examples ``members[starts[r]:starts[r + 1]]``, laid out in that order.
    """

    def __init__(self, examples: list[Example], rows: list[list[int]], seq_len: int, pad: int):
        self.seq_len, self.pad = seq_len, pad
        lengths = [len(e.ids) for e in examples]
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.ids = np.asarray([t for e in examples for t in e.ids], np.int32)
        self.learn = np.asarray([x for e in examples for x in e.learn], np.float32)
        self.members = np.asarray([e for r in rows for e in r], np.int64)
        self.starts = np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def loss_tokens(self) -> int:
        # An example's first token is never a target.
        return int(self.learn.sum() - self.learn[self.offsets[:-1]].sum())

    @property
    def fill(self) -> float:
        return self.num_tokens / max(len(self) * self.seq_len, 1)

    def rows(self, idx) -> Batch:
        idx = np.asarray(idx, np.int64)
        shape = (len(idx), self.seq_len)
        tokens = np.full(shape, self.pad, np.int32)
        targets = np.full(shape, self.pad, np.int32)
        positions = np.zeros(shape, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        loss_mask = np.zeros(shape, np.float32)
        for b, r in enumerate(idx):
            col = 0
            for seg, e in enumerate(self.members[self.starts[r] : self.starts[r + 1]], start=1):
                lo, hi = self.offsets[e], self.offsets[e + 1]
                n = hi - lo
                tokens[b, col : col + n] = self.ids[lo:hi]
                targets[b, col : col + n - 1] = self.ids[lo + 1 : hi]
                loss_mask[b, col : col + n - 1] = self.learn[lo + 1 : hi]
                positions[b, col : col + n] = np.arange(n)
                segment_ids[b, col : col + n] = seg
                col += n
        return {
            "tokens": tokens,
            "targets": targets,
            "positions": positions,
            "segment_ids": segment_ids,
            "loss_mask": loss_mask,
        }


def pack_best_fit(lengths: list[int], seq_len: int, order) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the row with the least room that fits it.

    Ties in length keep ``order``; the result depends only on ``lengths`` and ``order``.
    """
    rank = {e: i for i, e in enumerate(order)}
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free rooms that some row has
    by_room: dict[int, list[int]] = {}
    for e in sorted(order, key=lambda e: (-lengths[e], rank[e])):
        n = lengths[e]
        j = bisect.bisect_left(rooms, n)
        if j < len(rooms):
            room = rooms[j]
            r = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(j)
        else:
            room, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(e)
        room -= n
        if room >= 2:  # one token of room fits no example worth training on
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = []
            by_room[room].append(r)
    return rows


class SFTBatchIterator(BatchIterator):
    """``BatchIterator`` over ``SFTRows`` whose state also carries the data's fingerprint."""

    def __init__(self, rows: SFTRows, batch_size: int, seed: int, parts: dict):
        super().__init__(rows, batch_size, seed=seed)
        self._parts = parts  # what the fingerprint covers, kept to say what changed
        self.fingerprint = fingerprint_of(parts)

    def state(self) -> dict:
        return {**super().state(), "fingerprint": self.fingerprint, "data": self._parts}

    def restore(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            old = state.get("data") or {}
            changed = [k for k in self._parts if old.get(k) != self._parts[k]] or ["the data"]
            raise DataError(
                f"the checkpoint was trained on other fine-tuning data ({', '.join(changed)} "
                "changed since); resume with the same file, tokenizer and data settings, or start "
                "a new --out"
            )
        super().restore(state)


def fingerprint_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class SFTHeldout:
    """Held-out records: ``batches`` for a held-out loss, ``examples`` for generation."""

    rows: SFTRows
    examples: list[tuple[list[int], list[int]]]  # (prompt ids, completion ids); none for text

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, batch_size: int, max_batches: int | None = None):
        """Every held-out row in order, ``batch_size`` at a time (the last batch may be short)."""
        n = len(self.rows)
        count = -(-n // batch_size)
        for b in range(count if max_batches is None else min(count, max_batches)):
            yield self.rows.rows(np.arange(b * batch_size, min((b + 1) * batch_size, n)))


@dataclass
class SFTData:
    tokenizer: object
    train: SFTBatchIterator
    heldout: SFTHeldout
    description: str
    report: dict
    fingerprint: str


def _read(config: SFTDataConfig) -> tuple[Path, bytes]:
    if not config.path:
        raise ConfigError("data.path is empty; set it to a .jsonl file of fine-tuning records")
    path = Path(config.path)
    if path.suffix != ".jsonl":
        raise DataError(
            f"data.path {config.path!r} is not a .jsonl file; write one JSON record per line in "
            "a file ending in .jsonl (from a JSON array: jq -c '.[]' in.json > out.jsonl)"
        )
    try:
        return path, path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"data.path {config.path!r}: no such file; check the path") from e
    except OSError as e:
        raise DataError(
            f"cannot read data.path {config.path!r} ({e.strerror or e}); make it a readable file"
        ) from e


def _split(records: list[Record], fraction: float) -> set[str]:
    """The keys of held-out records: a fixed hash of each distinct record, never the seed."""
    keys = sorted({r.key for r in records}, key=lambda k: hashlib.sha256(k.encode()).digest())
    if len(keys) < 2:
        raise DataError(
            f"only {len(keys)} distinct usable record; fine-tuning needs at least two, one of "
            "them held out for evaluation; add records"
        )
    return set(keys[: min(max(1, round(fraction * len(keys))), len(keys) - 1)])


def _check_vocab(examples: list[Example], tok, pad: int, model_vocab_size: int) -> None:
    top, line = max((max(e.ids), e.line) for e in examples)
    if top < model_vocab_size and pad < model_vocab_size:
        return
    where = f"token id {top} on line {line}" if top >= model_vocab_size else f"padding id {pad}"
    raise DataError(
        f"{where} is outside the model's vocab_size={model_vocab_size} (the tokenizer has "
        f"{tok.vocab_size} ids); use the model's own tokenizer or a model with "
        f"vocab_size>={max(tok.vocab_size, top + 1, pad + 1)}"
    )


def _examples(config: SFTDataConfig, path: Path, records, skips: Skips, tok):
    """``(record, example)`` for every record that tokenizes and fits; bad ones go to ``skips``."""
    used: list[tuple[Record, Example]] = []
    for rec in records:
        try:
            ex = tokenize_record(rec, tok, config.completion_only_loss)
        except BadRecord as e:
            skips.add(rec.line, *e.args)
            continue
        except Refused as e:
            raise DataError(f"{path}:{rec.line}: {e}") from e
        if len(ex.ids) > config.seq_len:
            detail = f"the record is {len(ex.ids)} tokens, longer than seq_len={config.seq_len}"
            skips.add(rec.line, "over length", detail)
            continue
        used.append((rec, ex))
    if not used:
        first = "; ".join(skips.first.values()) or "the file holds no record"
        raise DataError(
            f"{path}: no usable record ({skips.summary(config.seq_len)}; {first}); fix the "
            "records (strict=True stops at the first with its fix)"
        )
    return used


def _rows(examples: list[Example], config: SFTDataConfig, pad: int, order) -> SFTRows:
    if config.packing:
        rows = pack_best_fit([len(e.ids) for e in examples], config.seq_len, order)
    else:
        rows = [[e] for e in order]
    return SFTRows(examples, rows, config.seq_len, pad)


def _fingerprint_parts(config: SFTDataConfig, raw: bytes, tok) -> dict:
    # The path and strictness do not change the batches; the bytes and every other setting do.
    settings = {k: v for k, v in asdict(config).items() if k not in ("path", "strict")}
    template = getattr(tok, "chat_template", None) or ""
    return {
        "file": hashlib.sha256(raw).hexdigest(),
        "tokenizer": tok.sha256,
        "chat_template": hashlib.sha256(template.encode()).hexdigest(),
        "settings": {**settings, "layout": _LAYOUT_VERSION},
    }


def build_sft_data(config: SFTDataConfig, tokenizer, model_vocab_size: int) -> SFTData:
    """Read, check and tokenize ``config.path``; split off held-out records; pack the rest.

    Raises ``DataError`` for an unreadable file, mixed formats, conversations without a chat
    template, token ids beyond ``model_vocab_size``, no usable record, fewer training rows than
    one batch, and (``strict``) the first bad record.
    """
    path, raw = _read(config)
    skips = Skips(str(path), config.strict)
    records = parse_records(path, raw, skips, config.completion_only_loss)
    n_records = len(records) + skips.total
    kind = records[0].kind if records else None
    if kind in (CONVERSATIONAL, MESSAGES) and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{path} holds {kind} records but the tokenizer has no chat template; use a tokenizer "
            "that ships one (tokenizer_config.json's chat_template) or write the records as "
            "prompt/completion text"
        )
    if tokenizer.eos_id is None and kind in (PROMPT_COMPLETION, TEXT):
        raise DataError(
            f"the tokenizer has no eos token to end each {kind} example with; use a tokenizer "
            "that defines eos_token"
        )
    used = _examples(config, path, records, skips, tokenizer)
    # Padding is never attended to nor learned: any valid id will do.
    pad = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    _check_vocab([ex for _, ex in used], tokenizer, pad, model_vocab_size)

    held_keys = _split([rec for rec, _ in used], config.heldout_fraction)
    train = [ex for rec, ex in used if rec.key not in held_keys]
    held = [(rec, ex) for rec, ex in used if rec.key in held_keys]
    # Its own random stream: the epochs' orders draw from (seed, epoch).
    order = np.random.default_rng([config.seed, 0, 1]).permutation(len(train)).tolist()
    train_rows = _rows(train, config, pad, order)
    T, B = config.seq_len, config.batch_size
    if len(train_rows) < B:
        raise DataError(
            f"the {len(train)} training records make {len(train_rows)} rows of {T} tokens, fewer "
            f"than one batch of data.batch_size={B}; add records or lower data.batch_size"
        )
    heldout = SFTHeldout(
        _rows([ex for _, ex in held], config, pad, range(len(held))),
        [p for rec, ex in held if (p := heldout_pair(rec, ex, tokenizer)) is not None],
    )
    it = SFTBatchIterator(train_rows, B, config.seed, _fingerprint_parts(config, raw, tokenizer))
    report = {
        "format": kind,
        "records": n_records,
        "used": len(used),
        "train_records": len(train),
        "heldout_records": len(held),
        "skipped": skips.report(),
        "train_tokens": train_rows.num_tokens,
        "loss_tokens": train_rows.loss_tokens,
        "rows": len(train_rows),
        "fill": round(train_rows.fill, 4),
    }
    description = (
        f"{len(used):,} {kind} records from {path} ({len(train):,} train, {len(held):,} held "
        f"out); {skips.summary(T)}; {train_rows.num_tokens:,} training tokens "
        f"({train_rows.loss_tokens:,} in the loss) in {len(train_rows):,} rows of {T} "
        f"({train_rows.fill:.1%} filled)"
    )
    if skips.total:
        log.warning("%s: %s", path, skips.summary(T))
    return SFTData(tokenizer, it, heldout, description, report, it.fingerprint)
