"""Data that is not clean UTF-8 text, lines too long for SentencePiece, tokenizers that do not fit."""

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest

from llmjax.data import (
    DataConfig,
    DataError,
    Tokenizer,
    TokenizerConfig,
    build_data,
    read_documents,
)
from llmjax.data.tokenizer import training_lines
from tests.train.helpers import corpus_paths

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "judges",
]


def _words(n: int, seed: int = 0) -> str:
    """``n`` words of varied text, spaces only: a stand-in for minified JSON or a book on one line."""
    return " ".join(WORDS[(i * 7 + i // 13 + seed) % len(WORDS)] + str(i % 97) for i in range(n))


def test_non_utf8_text_is_read_with_one_warning_that_counts(tmp_path, caplog):
    text = "Café crème, déjà vu, naïve façade.\n" * 40
    path = tmp_path / "latin.txt"
    path.write_bytes(text.encode("cp1252"))
    accents = sum(not c.isascii() for c in text)
    with caplog.at_level(logging.WARNING, logger="llmjax"):
        (doc,) = read_documents([path])
    assert doc.text.count("\ufffd") == accents
    assert doc.text.replace("\ufffd", "") == "".join(c for c in text if c.isascii())
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        f"data file {path} is not valid UTF-8: {accents:,} characters were replaced by U+FFFD; "
        "convert it to UTF-8 to keep them (e.g. iconv -f cp1252 -t utf-8)"
    ]


def test_text_with_a_few_odd_bytes_is_text(tmp_path, caplog):
    path = tmp_path / "log.txt"
    body = b"an ordinary line of a log file\n" * 200
    path.write_bytes(body + b"\x00\x07 a bell and a NUL\n\x1b[1mbold\x1b[0m\n" + body)
    with caplog.at_level(logging.WARNING, logger="llmjax"):
        (doc,) = read_documents([path])
    assert "a bell and a NUL" in doc.text
    assert not caplog.records  # valid UTF-8: nothing replaced, nothing to report


def test_byte_order_marks_select_the_encoding(tmp_path):
    (tmp_path / "a.txt").write_bytes("héllo wörld\n".encode("utf-16"))
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfplain\n")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert [d.text for d in docs] == ["héllo wörld\n", "plain\n"]


@pytest.mark.parametrize(
    "content, why",
    [
        (bytes(range(256)) * 8, "binary data (8 NUL bytes in its first 2,048 bytes)"),
        (b"\x1f\x8b\x08\x00" + b"compressed", "a gzip archive, not text; decompress it first"),
        ("Τι κάνεις; Καλά!\n".encode("cp1253") * 5, "is not UTF-8: 60 of its 85 characters"),
    ],
)
def test_files_that_are_not_text_are_refused(tmp_path, content, why):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="f.txt") as info:
        read_documents([path])
    assert why in str(info.value)


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("text")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(
        DataError, match=r"cannot read data file .*secret.txt \(Permission denied\)"
    ):
        read_documents([path])


def test_jsonl_records_must_be_objects_with_a_string_field(tmp_path):
    path = tmp_path / "d.jsonl"
    for line, why in [
        ('"just a string"', "d.jsonl:1: a string where a JSON object belongs"),
        ('{"text": 12}', "d.jsonl:1: field 'text' is a number, not a string"),
        ('{"text": {"body": "x"}}', "d.jsonl:1: field 'text' is an object, not a string"),
        ('{"body": "x"}', "d.jsonl:1: no 'text' field (its fields: 'body')"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises(DataError) as info:
            read_documents([path])
        assert why in str(info.value)
    path.write_text('{"text": null}\n{"text": "kept"}\n')
    assert [d.text for d in read_documents([path])] == ["kept"]


def test_a_corpus_of_one_huge_line_trains_a_tokenizer():
    line = _words(60_000)  # ~450 kB without a newline, far beyond max_sentence_length
    assert "\n" not in line and len(line.encode()) > 100_000
    tok = Tokenizer.train(training_lines([line], 10_000), TokenizerConfig(400))
    assert tok.vocab_size == 400
    sample = line[:5000]
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample.encode()) / 2  # merges were learnt, not bytes


def test_replacement_characters_never_become_pieces():
    # What a cp1252 corpus read as UTF-8 looks like: U+FFFD wherever an accent was.
    text = "\n".join(_words(40, seed=i).replace("o", "\ufffd") for i in range(300))
    tok = Tokenizer.train(training_lines([text], 10_000), TokenizerConfig(400))
    assert not [i for i in range(tok.vocab_size) if "\ufffd" in tok.id_to_piece(i)]
    assert [tok.id_to_piece(i) for i in tok.encode("\ufffd")] == ["<0xEF>", "<0xBF>", "<0xBD>"]
    assert tok.decode(tok.encode(text[:500])) == text[:500]


def test_too_few_pieces_fail_before_anything_is_kept(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    cfg = DataConfig(paths=(str(corpus),), seq_len=8, batch_size=1, heldout_fraction=0.3)
    with pytest.raises(DataError, match=r"yields only (\d+) tokenizer pieces") as info:
        build_data(cfg, tmp_path / "out", model_vocab_size=1024)
    assert "data.tokenizer_config.vocab_size=1024" in str(info.value)
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_a_given_tokenizer_is_copied_into_the_run(tmp_path):
    text = (Path(corpus_paths()[0]).read_text(encoding="utf-8"))[:200_000]
    tok = Tokenizer.train(training_lines([text], 20_000), TokenizerConfig(512))
    given = tmp_path / "elsewhere" / "mine.model"
    tok.save(given)
    cfg = DataConfig(paths=corpus_paths(), seq_len=32, batch_size=2, tokenizer=str(given))
    data = build_data(cfg, tmp_path / "run", model_vocab_size=512)
    (copy,) = (tmp_path / "run" / "tokenizer").glob("*.model")
    assert copy.name == f"mine-{tok.sha256[:12]}.model"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == data.tokenizer.sha256 == tok.sha256
    assert data.tokenizer.path == str(given)


def test_a_tokenizer_smaller_than_the_model_samples_only_ids_it_decodes(tmp_path):
    """A padded vocabulary is legal; the sample at the end of a run never draws the padding."""
    from llmjax.recipes import pretrain
    from tests.train.helpers import small_config

    lines = ["First Citizen:", "Before we proceed any further, hear me speak."]
    tok = Tokenizer.train(iter(lines), TokenizerConfig(512))
    cfg = small_config(steps=2, sample_tokens=48)
    assert tok.vocab_size < cfg.model.vocab_size  # ids the tokenizer cannot decode exist
    tok.save(tmp_path / "small.model")
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tmp_path / "small.model"))
    )
    logs = []
    pretrain.run(cfg, tmp_path / "run", log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    assert [line for line in logs if line.startswith("sample:")]
