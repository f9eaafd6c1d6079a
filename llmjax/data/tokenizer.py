"""A SentencePiece tokenizer with fixed special ids and exact round trips of code.

Special ids are the same for every tokenizer llmjax trains: pad 0, unk 1, bos 2, eos 3. Training
uses the identity normaliser, keeps whitespace as is, falls back to bytes for unseen characters
and makes ``\\n`` and ``\\t`` their own symbols: with SentencePiece's defaults most lines of code
do not survive ``decode(encode(text))``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from llmjax.data.sources import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB = 300  # byte fallback alone needs 256 pieces, plus the specials and the user symbols


@dataclass(frozen=True)
class TokenizerConfig:
    """How to train a tokenizer when none is given."""

    vocab_size: int = 1024
    model_type: str = "bpe"
    # Lines sampled for training: BPE on 300k lines takes seconds, unigram over a minute.
    max_lines: int = 200_000
    seed: int = 0

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise DataError(
                f"tokenizer model_type={self.model_type!r}: expected one of {MODEL_TYPES}"
            )
        if self.vocab_size < MIN_VOCAB:
            raise DataError(f"tokenizer vocab_size={self.vocab_size}: must be at least {MIN_VOCAB}")


class Tokenizer:
    """Encode text to int ids and back; wraps one serialized SentencePiece model."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.proto = model_proto
        self.path = path
        self.sha256 = hashlib.sha256(model_proto).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        p = Path(path)
        if not p.is_file():
            what = "is a directory" if p.is_dir() else "no such file"
            raise DataError(f"tokenizer {str(p)!r}: {what}; give a SentencePiece .model file")
        try:
            proto = p.read_bytes()
        except OSError as e:
            raise DataError(
                f"cannot read tokenizer {str(p)!r} ({e.strerror or e}); make it readable"
            ) from e
        try:
            return cls(proto, str(p))
        except RuntimeError as e:
            raise DataError(
                f"tokenizer {str(p)!r} is not a SentencePiece model ({e}); give the .model file "
                "that SentencePiece or `llmjax tokenizer train` wrote"
            ) from e

    @classmethod
    def train(cls, lines: Iterable[str], config: TokenizerConfig) -> Tokenizer:
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=out,
                vocab_size=config.vocab_size,
                model_type=config.model_type,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                byte_fallback=True,
                user_defined_symbols=["\n", "\t"],
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                max_sentence_length=16384,
                input_sentence_size=config.max_lines,
                shuffle_input_sentence=True,
                seed_sentencepiece_size=100_000,
                hard_vocab_limit=False,
                num_threads=min(os.cpu_count() or 1, 8),
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(f"tokenizer training failed: {e}") from e
        return cls(out.getvalue())

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_bytes(self.proto)
        os.replace(tmp, p)  # atomic: a reader never sees half a model
        self.path = str(p)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=min(os.cpu_count() or 1, 8))

    def decode(self, ids: Iterable[int]) -> str:
        # Specials never decode to text; drop them so a packed row decodes cleanly.
        return self._sp.decode([int(i) for i in ids if int(i) > EOS_ID])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


# SentencePiece skips a training sentence longer than max_sentence_length (16384 bytes, set
# above): at 4 bytes per character at most, a chunk of this many characters always fits.
MAX_LINE_CHARS = 4096


def _chunks(line: str) -> Iterator[str]:
    """``line`` in pieces of at most ``MAX_LINE_CHARS``, cut after a space where there is one."""
    while len(line) > MAX_LINE_CHARS:
        cut = line.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS) + 1 or MAX_LINE_CHARS
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def training_lines(texts: Iterable[str], max_lines: int, seed: int = 0) -> Iterator[str]:
    """Lines of the corpus for tokenizer training, a deterministic sample when there are many.

    Very long lines (minified JSON, a book without newlines) are cut into chunks SentencePiece
    accepts. U+FFFD, which stands for bytes that were not UTF-8, is left out so it never becomes
    a piece: such bytes are encoded through byte fallback like any unseen character.
    """
    lines = [c for t in texts for ln in t.replace("\ufffd", "").split("\n") for c in _chunks(ln)]
    if len(lines) > max_lines:
        lines = random.Random(seed).sample(lines, max_lines)
    return iter(lines)


def check_pieces(tok: Tokenizer, asked: int, setting: str) -> None:
    """Refuse a freshly trained tokenizer with fewer pieces than ``asked`` for.

    SentencePiece stops early when the text has too few distinct pieces; a smaller vocabulary
    than asked for would silently change what is trained, so the user chooses. ``setting`` is
    how the user sets the size (``--vocab-size``, ``--set data.tokenizer_config.vocab_size``).
    """
    if tok.vocab_size >= asked:
        return
    name = setting.split()[-1]
    fix = (
        f"add data or set {setting}={tok.vocab_size}"
        if tok.vocab_size >= MIN_VOCAB
        else f"add data (a tokenizer needs at least {MIN_VOCAB} pieces)"
    )
    raise DataError(
        f"the training text yields only {tok.vocab_size} tokenizer pieces, fewer than "
        f"{name}={asked}; {fix}"
    )


def check_special_ids(tok: Tokenizer) -> None:
    """Refuse a SentencePiece model whose special ids are not llmjax's (pad 0, unk 1, bos 2, eos 3).

    Documents are packed as ``[bos] ids [eos]`` with these ids, so another layout (Llama 2's
    unk 0, bos 1, eos 2, say) would train on the wrong boundary tokens without any error.
    """
    sp = tok._sp
    got = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
    if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
        raise DataError(
            f"tokenizer {tok.path or ''!r} has special ids pad, unk, bos, eos = {got}, llmjax "
            f"needs {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train one with `llmjax tokenizer train` "
            "or leave data.tokenizer empty to train one with the run"
        )
