"""A SentencePiece tokenizer with fixed special ids and exact round trips of code.

Special ids are the same for every tokenizer llmjax trains: pad 0, unk 1, bos 2, eos 3. Training
uses the identity normaliser, keeps whitespace as is, falls back to bytes for unseen characters
and makes ``\\n`` and ``\\t`` their own symbols: with SentencePiece's defaults most lines of code
do not survive ``decode(encode(text))``.

``Tokenizer`` offers the same surface as ``HFTokenizer`` (``llmjax.data.hf_tokenizer``), chat
included: its chat template is ``BUILTIN_CHAT_TEMPLATE``. ``encode`` always reads text as plain
text, so a corpus that contains the string ``</s>`` never yields the eos id; only the special
tokens a chat template itself writes become special ids.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

from llmjax.data.chat import (
    BUILTIN_CHAT_TEMPLATE,
    mask_from_spans,
    render_chat_with_spans,
    split_on_specials,
)
from llmjax.data.sources import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
MIN_VOCAB = 300  # byte fallback alone needs 256 pieces, plus the specials and the user symbols
SENTENCEPIECE_FILE = "tokenizer.model"  # its name in a directory, as Hugging Face names it
SPECIAL_NAMES = {"pad_token": PAD_ID, "unk_token": UNK_ID, "bos_token": BOS_ID, "eos_token": EOS_ID}
# Stand-ins for the special tokens while a chat template renders: Unicode noncharacters, kept
# for a program's internal use, so a message that quotes "</s>" stays text and only the
# template's own special tokens become special ids.
_CHAT_STAND_INS = {PAD_ID: "\ufdd0", UNK_ID: "\ufdd1", BOS_ID: "\ufdd2", EOS_ID: "\ufdd3"}


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
        """Write the model to the file ``path``, or as ``tokenizer.model`` into an existing directory."""
        p = Path(path)
        if p.is_dir():
            p = p / SENTENCEPIECE_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        tmp.write_bytes(self.proto)
        os.replace(tmp, p)  # atomic: a reader never sees half a model
        self.path = str(p)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
    stop_ids: tuple[int, ...] = (EOS_ID,)
    chat_template: str | None = BUILTIN_CHAT_TEMPLATE

    @property
    def special_tokens(self) -> dict[str, str]:
        """The special tokens by the names chat templates use (``bos_token``...)."""
        return {name: self._sp.id_to_piece(i) for name, i in SPECIAL_NAMES.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``text`` as ids, read as plain text; ``add_special_tokens`` puts bos in front."""
        ids = self._sp.encode(text)
        return [BOS_ID, *ids] if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        batch = self._sp.encode(list(texts), num_threads=min(os.cpu_count() or 1, 8))
        return [[BOS_ID, *ids] for ids in batch] if add_special_tokens else batch

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # Specials never decode to text; drop them so a packed row decodes cleanly.
            return self._sp.decode([i for i in ids if i > EOS_ID])
        # SentencePiece drops control ids: write them as their pieces, decoding the runs between.
        out, run = [], []
        for i in ids:
            if i > EOS_ID:
                run.append(i)
                continue
            out += [self._sp.decode(run), self._sp.id_to_piece(i)]
            run = []
        return "".join([*out, self._sp.decode(run)])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        chat_template: str | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | tuple[list[int], list[int]]:
        """``messages`` rendered by the built-in chat template (or ``chat_template``).

        Returns the text when ``tokenize`` is false, else its ids, in which the special tokens
        the template writes are their ids. ``return_assistant_tokens_mask`` also returns a 0/1
        list, 1 on the tokens of the template's ``{% generation %}`` blocks (the assistant's
        turns). ``kwargs`` (``tools``, ``documents``, anything the template reads) reach the
        template as variables.
        """
        stand_ins = {name: _CHAT_STAND_INS[i] for name, i in SPECIAL_NAMES.items()}
        text, spans = render_chat_with_spans(
            chat_template or BUILTIN_CHAT_TEMPLATE,
            messages,
            add_generation_prompt,
            **{**stand_ins, **kwargs},
        )
        if not tokenize:
            for i, stand_in in _CHAT_STAND_INS.items():
                text = text.replace(stand_in, self._sp.id_to_piece(i))
            return text
        specials = {stand_in: i for i, stand_in in _CHAT_STAND_INS.items()}
        pieces = split_on_specials(text, specials)
        ids, offsets = _encode_pieces(self._sp, text, pieces, return_assistant_tokens_mask)
        return (ids, mask_from_spans(offsets, spans)) if return_assistant_tokens_mask else ids


def _encode_pieces(sp, text: str, pieces, with_offsets: bool):
    """Ids (and character offsets) of ``text`` cut by ``split_on_specials`` into ``pieces``."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for a, b, special in pieces:
        if special is not None:
            ids.append(special)
            offsets.append((a, b))
        elif with_offsets:  # sentencepiece >= 0.2.3
            enc = sp.encode_as_offset_mapping(text[a:b])
            ids += enc["ids"]
            offsets += [(a + x, a + y) for x, y in enc["offsets"]]
        else:
            ids += sp.encode(text[a:b])
    return ids, offsets


class SentencePieceBackend:
    """Another model's SentencePiece ``tokenizer.model`` with its added tokens, for ``HFTokenizer``.

    Added and special tokens are found in the raw text first and each piece of text between
    them is encoded on its own, which is how transformers runs such a model. ``added`` is the
    ``added_tokens_decoder`` of ``tokenizer_config.json`` (id → {content, special, lstrip,
    rstrip}); ``specials`` the special tokens by name, completed here from the model file.
    """

    def __init__(
        self,
        data: bytes,
        added: dict[int, dict],
        specials: dict[str, str],
        config: dict,
        where: str,
    ):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError as e:
            raise DataError(
                f"{where}/{SENTENCEPIECE_FILE} is not a SentencePiece model ({e}); restore it"
            ) from e
        sp = self._sp
        # transformers takes the special tokens the model file defines when the config is silent.
        for name, i in {
            "bos_token": sp.bos_id(),
            "eos_token": sp.eos_id(),
            "unk_token": sp.unk_id(),
        }.items():
            if i >= 0:
                specials.setdefault(name, sp.id_to_piece(i))
        self.added: dict[str, int] = {}
        self.strip: dict[str, tuple[bool, bool]] = {}
        self.special_ids: set[int] = set()
        for i, t in sorted(added.items()):
            self.added[t["content"]] = i
            self.strip[t["content"]] = (t.get("lstrip", False), t.get("rstrip", False))
            if t.get("special", False):
                self.special_ids.add(i)
        next_id = max([sp.get_piece_size() - 1, *self.added.values()]) + 1
        for content in specials.values():
            if content not in self.added:
                i = sp.piece_to_id(content)
                if sp.id_to_piece(i) != content:  # not a piece: transformers appends it
                    i, next_id = next_id, next_id + 1
                self.added[content] = i
            self.special_ids.add(self.added[content])
        self.content = {i: c for c, i in self.added.items()}
        self.vocab_size = next_id
        self.add_bos = specials.get("bos_token") if config.get("add_bos_token") else None
        self.add_eos = specials.get("eos_token") if config.get("add_eos_token") else None
        # Decoding drops the space that a dummy prefix put before the first word only.
        self.dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def _pieces(self, text: str):
        return list(split_on_specials(text, self.added, self.strip))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        pieces = [self._pieces(t) for t in texts]
        plain = [t[a:b] for t, ps in zip(texts, pieces, strict=True) for a, b, i in ps if i is None]
        encoded = iter(self._sp.encode(plain, num_threads=min(os.cpu_count() or 1, 8)))
        head = [self.added[self.add_bos]] if add_special_tokens and self.add_bos else []
        tail = [self.added[self.add_eos]] if add_special_tokens and self.add_eos else []
        out = []
        for ps in pieces:
            ids = list(head)
            for _, _, i in ps:
                ids += next(encoded) if i is None else [i]
            out.append(ids + tail)
        return out

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return _encode_pieces(self._sp, text, self._pieces(text), True)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []

        def flush():
            if not run:
                return
            text = self._sp.decode(run)
            if out and self.dummy_prefix and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                text = " " + text  # only the text's very first word loses its prefix space
            out.append(text)
            run.clear()

        for i in ids:
            if i not in self.content:
                run.append(i)
            elif not (skip_special_tokens and i in self.special_ids):
                flush()
                out.append(self.content[i])
        flush()
        return "".join(out)


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
