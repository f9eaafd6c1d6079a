import json

import numpy as np
import pytest

from llmjax.data import (
    BatchIterator,
    DataConfig,
    DataError,
    Document,
    PackedRows,
    TokenizerConfig,
    TokenStream,
    build_data,
    eval_batches,
    read_documents,
    resolve_paths,
)
from llmjax.data.sources import split_documents


def stream_of(lengths, seed=0):
    """Documents of the given lengths with distinct ids, as a token stream (bos/eos included)."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[2], rng.integers(4, 500, n), [3]]) for n in lengths]
    tokens = np.concatenate(docs).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return TokenStream(tokens, offsets)


def test_rows_match_a_direct_construction():
    stream = stream_of([5, 40, 1, 17, 90, 3, 30])
    rows = PackedRows(stream, seq_len=16)
    assert len(rows) == (stream.num_tokens - 1) // 16
    doc_of = np.searchsorted(stream.offsets, np.arange(stream.num_tokens), side="right") - 1
    b = rows.rows(np.arange(len(rows)))
    for r in range(len(rows)):
        s = r * 16
        np.testing.assert_array_equal(b["tokens"][r], stream.tokens[s : s + 16])
        np.testing.assert_array_equal(b["targets"][r], stream.tokens[s + 1 : s + 17])
        for t in range(16):
            d = doc_of[s + t]
            # positions restart in every document and at the row start
            assert b["positions"][r, t] == s + t - max(stream.offsets[d], s)
            assert b["segment_ids"][r, t] == d - doc_of[s] + 1
            assert b["loss_mask"][r, t] == float(doc_of[s + t + 1] == d)
    # Every masked target is the bos that opens the next document.
    assert set(b["targets"][b["loss_mask"] == 0].tolist()) == {2}
    assert all(v.dtype == (np.float32 if k == "loss_mask" else np.int32) for k, v in b.items())


def test_iterator_is_deterministic_and_resumable():
    rows = PackedRows(stream_of([200] * 20), seq_len=32)
    a = BatchIterator(rows, batch_size=4, seed=7)
    seen = [next(a)["tokens"] for _ in range(3 * a.batches_per_epoch + 2)]  # crosses epochs
    b = BatchIterator(rows, batch_size=4, seed=7)
    for _ in range(5):
        next(b)
    state = json.loads(json.dumps(b.state()))  # it lives in a JSON checkpoint item
    c = BatchIterator(rows, batch_size=4, seed=7)
    c.restore(state)
    for i in range(5, len(seen)):
        np.testing.assert_array_equal(next(c)["tokens"], seen[i])
    # Each epoch visits distinct rows; another seed gives another order.
    epoch = np.concatenate([x for x in seen[: a.batches_per_epoch]])
    assert len({r.tobytes() for r in epoch}) == a.batches_per_epoch * 4
    d = BatchIterator(rows, batch_size=4, seed=8)
    assert not np.array_equal(next(d)["tokens"], seen[0])


def test_restore_rejects_other_data():
    rows = PackedRows(stream_of([200] * 20), seq_len=32)
    state = BatchIterator(rows, batch_size=4, seed=0).state()
    other = BatchIterator(rows, batch_size=8, seed=0)
    with pytest.raises(DataError, match="batch_size was 4 now 8"):
        other.restore(state)


def test_too_small_corpus_and_eval_batches():
    rows = PackedRows(stream_of([10]), seq_len=8)
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchIterator(rows, batch_size=4)
    assert sum(1 for _ in eval_batches(rows, 4)) == 1  # one partial batch of the single row


def test_sources_files_dirs_globs_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 3}) + "\n"
    )
    (tmp_path / "sub" / "skip.bin").write_bytes(b"\0\1")
    assert [p.name for p in resolve_paths([str(tmp_path)])] == ["a.txt", "b.jsonl"]
    assert [p.name for p in resolve_paths([str(tmp_path / "**" / "*.jsonl")])] == ["b.jsonl"]
    docs = read_documents(resolve_paths([str(tmp_path)]))
    assert [d.text for d in docs] == ["alpha\nbeta\n", "one", "two"]
    with pytest.raises(DataError, match="no such file"):
        resolve_paths([str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matches no files"):
        resolve_paths([str(tmp_path / "*.parquet")])
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no 'text' field"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="corpus is empty"):
        read_documents([tmp_path / "empty.txt"])


def test_split_is_deterministic_and_disjoint():
    many = [Document(f"f{i}.py", f"x = {i}\n") for i in range(200)]
    train, held = split_documents(many, 0.1)
    assert 5 < len(held) < 40 and len(train) + len(held) == 200
    assert {d.key for d in train}.isdisjoint(d.key for d in held)
    assert split_documents(list(reversed(many)), 0.1)[1] == list(reversed(held))
    one = [Document("book", "".join(f"line {i}\n" for i in range(100)))]
    (t,), (h,) = split_documents(one, 0.1)
    assert t.text + h.text == one[0].text and h.text.startswith("line 90")


def test_build_data_caches_tokens(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(3000)))
    # Repetitive text yields few distinct pieces: ask for no more than it has.
    cfg = DataConfig(
        paths=(str(corpus),), seq_len=32, batch_size=4, tokenizer_config=TokenizerConfig(300)
    )
    data = build_data(cfg, tmp_path / "out", model_vocab_size=2048)
    cached = sorted(p.name for p in (tmp_path / "out" / "cache").iterdir())
    assert len(cached) == 4  # tokens + offsets for train and held-out
    again = build_data(cfg, tmp_path / "out", model_vocab_size=2048)
    assert again.tokenizer.sha256 == data.tokenizer.sha256
    np.testing.assert_array_equal(next(again.train)["tokens"], next(data.train)["tokens"])
    small = data.tokenizer.vocab_size - 1
    with pytest.raises(DataError, match=f"model's vocab_size is {small}"):
        build_data(cfg, tmp_path / "out", model_vocab_size=small)
