import sysconfig
from pathlib import Path

import pytest

from llmjax.data import DataError, Tokenizer, TokenizerConfig
from llmjax.data.tokenizer import training_lines

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def code_tokenizer():
    texts = [p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))[:40]]
    return Tokenizer.train(training_lines(texts, 50_000), TokenizerConfig(600))


def test_code_round_trips_exactly(code_tokenizer):
    # Files the tokenizer never saw: indentation, tabs, blank lines and unicode all survive.
    files = sorted(STDLIB.glob("*.py"))[40:70]
    assert files
    for p in files:
        text = p.read_text(encoding="utf-8")
        assert code_tokenizer.decode(code_tokenizer.encode(text)) == text, p.name
    odd = "\tx = 'héllo  wörld 中文'\n\n\n    \r\n  trailing   \n"
    assert code_tokenizer.decode(code_tokenizer.encode(odd)) == odd


def test_special_ids_and_save_load(code_tokenizer, tmp_path):
    t = code_tokenizer
    assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id) == (0, 1, 2, 3)
    assert [t.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert t.vocab_size == 600
    path = tmp_path / "tok.model"
    t.save(path)
    again = Tokenizer.load(path)
    assert again.sha256 == t.sha256
    assert again.encode("def f(x):\n\treturn x") == t.encode("def f(x):\n\treturn x")
    # Specials are dropped when decoding a packed row.
    assert t.decode([t.bos_id, *t.encode("abc"), t.eos_id]) == "abc"


def test_unigram_trains(tmp_path):
    lines = [f"line {i} with some words and {i * 7} numbers" for i in range(2000)]
    t = Tokenizer.train(iter(lines), TokenizerConfig(400, model_type="unigram"))
    assert t.decode(t.encode(lines[5])) == lines[5]


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(DataError, match="model_type"):
        TokenizerConfig(model_type="wordpiece")
    with pytest.raises(DataError, match="at least 300"):
        TokenizerConfig(vocab_size=100)
