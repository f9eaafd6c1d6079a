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
        if self.vocab_size < 300:
            # Byte fallback alone needs 256 pieces, plus the specials and the two user symbols.
            raise DataError(f"tokenizer vocab_size={self.vocab_size}: must be at least 300")


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
            raise DataError(f"tokenizer {str(p)!r}: no such file")
        try:
            return cls(p.read_bytes(), str(p))
        except RuntimeError as e:
            raise DataError(f"tokenizer {str(p)!r} is not a SentencePiece model: {e}") from e

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


def training_lines(texts: Iterable[str], max_lines: int, seed: int = 0) -> Iterator[str]:
    """Lines of the corpus for tokenizer training, a deterministic sample when there are many."""
    lines = [ln for t in texts for ln in t.split("\n") if ln]
    if len(lines) > max_lines:
        lines = random.Random(seed).sample(lines, max_lines)
    return iter(lines)
