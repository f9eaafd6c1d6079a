"""Tokenise a corpus once and keep the result on disk as a flat array of ids.

Every document becomes ``[bos] + ids + [eos]`` in one stream; ``offsets[i]`` is where document
``i`` starts (with a final entry at the end). The files are named by a hash of the corpus and the
tokenizer, so a changed file or tokenizer never reuses a stale cache, and they are memory-mapped
so a corpus larger than memory costs only what a batch reads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmjax.data.sources import DataError, Document, corpus_hash
from llmjax.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray  # [N] uint16 or int32 ids, documents back to back
    offsets: np.ndarray  # [num_docs + 1] int64 start of each document, then N

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_docs(self) -> int:
        return int(self.offsets.shape[0] - 1)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
) -> TokenStream:
    """The token stream of ``docs``, read from ``cache_dir`` when an identical one was made before."""
    key = hashlib.sha256((corpus_hash(docs) + tokenizer.sha256).encode()).hexdigest()[:20]
    if cache_dir is not None:
        cache = Path(cache_dir)
        tok_path, off_path = cache / f"tokens-{key}.npy", cache / f"offsets-{key}.npy"
        if tok_path.exists() and off_path.exists():
            return TokenStream(np.load(tok_path, mmap_mode="r"), np.load(off_path))
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.int32
    pieces, lengths = [], []
    batch = 256  # SentencePiece encodes a list in parallel; bound the memory held at once
    for i in range(0, len(docs), batch):
        for ids in tokenizer.encode_batch([d.text for d in docs[i : i + batch]]):
            arr = np.empty(len(ids) + 2, dtype)
            arr[0], arr[1:-1], arr[-1] = tokenizer.bos_id, ids, tokenizer.eos_id
            pieces.append(arr)
            lengths.append(arr.shape[0])
    if not pieces:
        raise DataError("the corpus is empty: nothing to tokenise")
    tokens = np.concatenate(pieces)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if cache_dir is not None:
        cache.mkdir(parents=True, exist_ok=True)
        # Offsets last: a reader checks both exist, so a crash between the two leaves no pair.
        _atomic_save(tok_path, tokens)
        _atomic_save(off_path, offsets)
    return TokenStream(tokens, offsets)
