"""From a ``DataConfig`` to a tokenizer, a resumable training iterator and a held-out split."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from llmjax.data.packing import BatchIterator, PackedRows
from llmjax.data.sources import (
    DataError,
    corpus_hash,
    read_documents,
    resolve_paths,
    split_documents,
    stdlib_files,
)
from llmjax.data.tokenizer import (
    Tokenizer,
    TokenizerConfig,
    check_pieces,
    check_special_ids,
    training_lines,
)
from llmjax.data.tokens import tokenize_documents


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes batches.

    ``paths`` empty means the default corpus: a seeded sample of ``stdlib_max_files`` of the
    running interpreter's standard-library sources. ``tokenizer`` empty means train one
    (``tokenizer_config``) and cache it in the output directory.
    """

    paths: tuple[str, ...] = ()
    text_field: str = "text"
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    heldout_fraction: float = 0.05
    stdlib_max_files: int = 300
    tokenizer: str = ""
    tokenizer_config: TokenizerConfig = TokenizerConfig()
    cache_dir: str = ""  # empty: <out>/cache

    def __post_init__(self):
        if self.seq_len < 2:
            raise DataError(f"data.seq_len={self.seq_len}: must be at least 2")
        if self.batch_size < 1:
            raise DataError(f"data.batch_size={self.batch_size}: must be positive")


@dataclass
class Data:
    tokenizer: Tokenizer
    train: BatchIterator
    heldout: PackedRows
    description: str
    # The training documents' contents, the tokenizer and every setting that changes the
    # batches: a run resumed on other data is refused instead of silently continuing.
    fingerprint: str = ""


def load_documents(config: DataConfig):
    if config.paths:
        docs = read_documents(resolve_paths(config.paths), config.text_field)
        desc = f"{len(docs)} documents from {', '.join(config.paths)}"
    else:
        files = stdlib_files(config.stdlib_max_files, config.seed)
        docs = read_documents(files)
        desc = f"{len(docs)} Python standard-library files"
    return split_documents(docs, config.heldout_fraction), desc


def get_tokenizer(config: DataConfig, train_docs, out_dir: str | os.PathLike) -> Tokenizer:
    """The configured tokenizer, or one trained on ``train_docs``; either is kept under ``out_dir``.

    A configured tokenizer is copied into ``<out_dir>/tokenizer/`` so the run stays usable when
    the original file moves (checkpoints find their tokenizer there by its hash).
    """
    if config.tokenizer:
        tok = Tokenizer.load(config.tokenizer)
        check_special_ids(tok)
        path = Path(config.tokenizer)
        copy = Path(out_dir) / "tokenizer" / f"{path.stem}-{tok.sha256[:12]}.model"
        if not copy.exists():
            Tokenizer(tok.proto).save(copy)
        return tok
    tc = config.tokenizer_config
    key = hashlib.sha256(f"{corpus_hash(train_docs)}{tc}".encode()).hexdigest()[:16]
    path = Path(out_dir) / "tokenizer" / f"{tc.model_type}-{tc.vocab_size}-{key}.model"
    if path.exists():
        return Tokenizer.load(path)
    lines = training_lines((d.text for d in train_docs), tc.max_lines, tc.seed)
    tok = Tokenizer.train(lines, tc)
    check_pieces(tok, tc.vocab_size, "--set data.tokenizer_config.vocab_size")
    tok.save(path)
    return tok


def build_data(
    config: DataConfig, out_dir: str | os.PathLike, model_vocab_size: int, tokenizer=None
) -> Data:
    """Batches of ``config``'s text; ``tokenizer`` (a loaded one, e.g. a teacher's) replaces the
    configured or trained tokenizer and needs the bos and eos ids documents are packed with."""
    (train_docs, heldout_docs), desc = load_documents(config)
    if tokenizer is None:
        tok = get_tokenizer(config, train_docs, out_dir)
    elif tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise DataError(
            f"tokenizer {tokenizer.path!r} has no bos or eos token to separate documents; give "
            'the text as jsonl records ({"text": ...}) instead'
        )
    else:
        tok = tokenizer
    if tok.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer has {tok.vocab_size} pieces but the model's vocab_size is "
            f"{model_vocab_size}; use a smaller tokenizer or set model.vocab_size>={tok.vocab_size}"
        )
    cache = config.cache_dir or Path(out_dir) / "cache"
    train = PackedRows(tokenize_documents(train_docs, tok, cache), config.seq_len)
    heldout = PackedRows(tokenize_documents(heldout_docs, tok, cache), config.seq_len)
    it = BatchIterator(train, config.batch_size, seed=config.seed)
    if len(heldout) == 0:
        raise DataError(
            f"the held-out split ({heldout.stream.num_tokens} tokens) is shorter than one sequence "
            f"of {config.seq_len}; add data or raise data.heldout_fraction"
        )
    desc += (
        f"; {train.stream.num_tokens:,} training tokens, {len(train):,} rows of {config.seq_len}"
    )
    h = hashlib.sha256(f"{tok.sha256} {config.seq_len} {config.batch_size} {config.seed}".encode())
    for d in train_docs:  # contents only: the same corpus moved elsewhere is the same data
        h.update(hashlib.sha256(d.text.encode("utf-8", "surrogatepass")).digest())
    return Data(tok, it, heldout, desc, h.hexdigest())
