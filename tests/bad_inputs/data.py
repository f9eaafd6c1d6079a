"""Bad training data: rows of the bad-input table (tests/test_bad_inputs.py).

Every ``pretrain`` row fails while the data is read or the tokenizer is made, before any training
step: ``_nothing_trained`` checks that no checkpoint was written.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import sentencepiece as spm

from llmjax.data import (
    DataConfig,
    DataError,
    Tokenizer,
    TokenizerConfig,
    build_data,
    read_documents,
    resolve_paths,
)
from tests.bad_inputs import Api, Cli, Env
from tests.train.helpers import cli_args

BINARY = bytes(range(256)) * 64
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64)
# Enough text for a tokenizer of 300-odd pieces, not for the 512 the shared test config asks for.
FEW_PIECES = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
)


def _pretrain(env: Env, data: list[str], *extra: str) -> list[str]:
    """``llmjax pretrain`` of the shared test config on ``data`` instead of the test corpus."""
    args = cli_args(env.tmp / "out", steps=2, extra=extra)
    at = args.index("--data") + 1
    end = args.index("--out")
    return [*args[:at], *data, *args[end:]]


def _nothing_trained(env: Env) -> None:
    assert not (env.tmp / "out" / "checkpoints").exists()


def _unchanged(name: str, content: bytes):
    def check(env: Env) -> None:
        assert (env.tmp / name).read_bytes() == content
        _nothing_trained(env)

    return check


def _llama2_style_tokenizer(env: Env) -> str:
    """A SentencePiece model with SentencePiece's default ids (unk 0, bos 1, eos 2, no pad)."""
    path = env.tmp / "other.model"
    lines = ["alpha beta gamma delta", "one two three four five"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(path.with_suffix("")),
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return str(path)


def _no_tokenizer_kept(env: Env) -> None:
    kept = env.tmp / "out" / "tokenizer"
    assert not kept.exists() or not list(kept.iterdir()), list(kept.iterdir())


def _jsonl(env: Env, *records) -> str:
    return env.write("d.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _data_dir(env: Env) -> str:
    env.write("docs/good.txt", "plain text\n" * 50)
    env.write("docs/notes.txt", BINARY)
    return str(env.tmp / "docs")


def _build(env: Env, paths, **data) -> object:
    cfg = DataConfig(paths=tuple(paths), seq_len=16, batch_size=2, **data)
    return build_data(cfg, env.tmp / "out", model_vocab_size=512)


CASES = [
    Cli(
        "empty corpus",
        lambda e: _pretrain(e, [e.write("empty.txt", "\n \n")]),
        "corpus is empty",
        after=_nothing_trained,
    ),
    Cli(
        "missing data file",
        lambda e: _pretrain(e, [str(e.tmp / "missing.txt")]),
        "no such file",
        after=_nothing_trained,
    ),
    Cli(
        "data: random bytes",
        lambda e: _pretrain(e, [e.write("notes.bin", BINARY)]),
        "notes.bin is binary data (64 NUL bytes in its first 16,384 bytes), not text",
        _unchanged("notes.bin", BINARY),
    ),
    Cli(
        "data: a gzip archive",
        lambda e: _pretrain(e, [e.write("c.txt.gz", gzip.compress(b"some text\n" * 100))]),
        "c.txt.gz is a gzip archive, not text; decompress it first",
        _nothing_trained,
    ),
    Cli(
        "data: a PNG image",
        lambda e: _pretrain(e, [e.write("logo.png", PNG)]),
        "logo.png is a PNG image, not text",
        _nothing_trained,
    ),
    Cli(
        "data: a binary .txt inside a directory",
        lambda e: _pretrain(e, [_data_dir(e)]),
        "notes.txt is binary data",
        _nothing_trained,
    ),
    Cli(
        "data: text in another encoding",
        lambda e: _pretrain(e, [e.write("greek.txt", "Καλημέρα κόσμε\n".encode("cp1253") * 20)]),
        "greek.txt is not UTF-8: 260 of its 300 characters are not valid UTF-8; convert it",
        _nothing_trained,
    ),
    Cli(
        "data: corpus too small for the vocabulary",
        lambda e: _pretrain(e, [e.write("tiny.txt", FEW_PIECES)]),
        "fewer than data.tokenizer_config.vocab_size=512; add data or set --set "
        "data.tokenizer_config.vocab_size=",
        _nothing_trained,
    ),
    Cli(
        "data: jsonl line that is not an object",
        lambda e: _pretrain(e, [_jsonl(e, {"text": "fine"}, ["a", "list"])]),
        "d.jsonl:2: an array where a JSON object belongs",
        _nothing_trained,
    ),
    Cli(
        "data: jsonl text field that is not a string",
        lambda e: _pretrain(e, [_jsonl(e, {"text": ["a", "b"]})]),
        "d.jsonl:1: field 'text' is an array, not a string; set data.text_field",
        _nothing_trained,
    ),
    Cli(
        "data: jsonl without the text field",
        lambda e: _pretrain(e, [_jsonl(e, {"body": "x", "id": 1})]),
        "no 'text' field (its fields: 'body', 'id'); set data.text_field",
        _nothing_trained,
    ),
    Cli(
        "data: jsonl line that is not JSON",
        lambda e: _pretrain(e, [e.write("d.jsonl", '{"text": "ok"}\n{text: oops}\n')]),
        "d.jsonl:2: not valid JSON",
        _nothing_trained,
    ),
    Cli(
        "data: a directory without text files",
        lambda e: _pretrain(e, [str(Path(e.write("dir/table.csv", "a,b\n")).parent)]),
        "the directory holds no files ending in .txt",
        _nothing_trained,
    ),
    Cli(
        "data: a tokenizer that is not SentencePiece",
        lambda e: _pretrain(e, list(e.corpus), "--tokenizer", e.write("t.model", b"not a model")),
        "is not a SentencePiece model",
        _nothing_trained,
    ),
    Cli(
        "data: a tokenizer with other special ids",
        lambda e: _pretrain(e, list(e.corpus), "--tokenizer", _llama2_style_tokenizer(e)),
        "has special ids pad, unk, bos, eos = (-1, 0, 1, 2), llmjax needs (0, 1, 2, 3)",
        _nothing_trained,
    ),
    Cli(
        "data: a tokenizer that is a directory",
        lambda e: _pretrain(e, list(e.corpus), "--tokenizer", str(e.tmp)),
        "is a directory; give a SentencePiece .model file",
        _nothing_trained,
    ),
    Api(
        "data api: binary file",
        lambda e: read_documents([Path(e.write("x.npy", b"\x93NUMPY\x01\x00" + bytes(100)))]),
        DataError,
        "x.npy is a NumPy array, not text",
    ),
    Api(
        "data api: a directory passed as a file",
        lambda e: read_documents([e.tmp]),
        DataError,
        "is a directory, not a file",
    ),
    Api(
        "data api: empty directory",
        lambda e: resolve_paths([str(e.tmp)]),
        DataError,
        "holds no files ending in",
    ),
    Api(
        "data api: too few pieces, no tokenizer kept",
        lambda e: _build(
            e, [e.write("tiny.txt", FEW_PIECES)], tokenizer_config=TokenizerConfig(512)
        ),
        DataError,
        "tokenizer pieces, fewer than data.tokenizer_config.vocab_size=512",
        _no_tokenizer_kept,
    ),
    Api(
        "data api: tokenizer with other special ids",
        lambda e: _build(e, e.corpus, tokenizer=_llama2_style_tokenizer(e)),
        DataError,
        "special ids",
    ),
    Api(
        "data api: tokenizer file that is missing",
        lambda e: Tokenizer.load(e.tmp / "none.model"),
        DataError,
        "no such file",
    ),
]
