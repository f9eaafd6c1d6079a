"""Prompts for RL: string and message prompts, truncation, fields, width, splits, resuming, bad data."""

import json

import numpy as np
import pytest

from llmjax.data import Tokenizer, TokenizerConfig
from llmjax.data.hf_tokenizer import HFTokenizer, open_tokenizer
from llmjax.data.prompts import PromptDataConfig, build_prompt_data
from llmjax.errors import ConfigError, DataError
from tests.recipes.hf_base import NUMBERS, make_tokenizer

WORDS = ("red", "blue", "fox", "dog", "cat", "sat", "ran", "on", "the", "mat", "and", "big", "is")


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {i} + {i * 3} = {i * 4}" for i in range(3000)]
    lines += ["Question: what is", "Answer:", "User:", "Assistant:", "System:"] * 50
    return Tokenizer.train(iter(lines), TokenizerConfig(vocab_size=320))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """The ChatML byte-level BPE of the recipe tests, as transformers has it and as llmjax opens it."""
    path = tmp_path_factory.mktemp("hf_tokenizer")
    return make_tokenizer(path), open_tokenizer(path)


def _q(i):
    return {"prompt": f"Question: what is {i} plus {i}?\nAnswer:", "answer": str(2 * i)}


def _user(text):
    return {"role": "user", "content": text}


def _chat(i):
    prompt = [
        {"role": "system", "content": "Be brief."},
        _user(f"what is {NUMBERS[i % 10]} plus {i}"),
    ]
    return {"prompt": prompt, "answer": i + i % 10}


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def build(path, tok, vocab=512, **settings):
    settings = {"batch_size": 2, "heldout_fraction": 0.1, **settings}
    return build_prompt_data(PromptDataConfig(path=str(path), **settings), tok, vocab)


def all_train(data):
    return data.train_prompts.rows(np.arange(len(data.train_prompts)))


def check_layout(data, batch, pad):
    """Each row: its prompt's ids, then padding to the data's one width."""
    B = len(batch["index"])
    assert batch["tokens"].shape == (B, data.width)
    for k in ("tokens", "lengths", "index"):
        assert batch[k].dtype == np.int32 and len(batch[k]) == B
    for b, i in enumerate(batch["index"]):
        ids, n = data.train_prompts.prompts[i].ids, batch["lengths"][b]
        assert n == len(ids) >= 1
        assert batch["tokens"][b, :n].tolist() == ids
        assert (batch["tokens"][b, n:] == pad).all()


def test_string_prompts_are_encoded_with_special_tokens(tok, hf, tmp_path):
    records = [_q(i) for i in range(30)]
    data = build(write(tmp_path, records), tok)
    batch = all_train(data)
    check_layout(data, batch, tok.pad_id)
    assert data.report["format"] == "prompt" and data.report["truncated_prompts"] == 0
    assert len(data.train_prompts) + len(data.heldout) == 30
    for p in data.train_prompts.prompts + data.heldout:
        rec = records[p.line - 1]
        assert p.ids == tok.encode(rec["prompt"], add_special_tokens=True)
        assert p.ids[0] == tok.bos_id and p.text == rec["prompt"]
        assert p.fields == {"answer": rec["answer"]}

    fast, hf_tok = hf
    records = [{"prompt": f"what is {a} plus {b}", "answer": a + b} for a in NUMBERS for b in "12"]
    data = build(write(tmp_path, records, "hf.jsonl"), hf_tok)
    check_layout(data, all_train(data), fast.pad_token_id)
    for p in data.train_prompts.prompts + data.heldout:
        rec = records[p.line - 1]
        assert p.ids == fast(rec["prompt"])["input_ids"] and p.text == rec["prompt"]


def test_message_prompts_render_the_chat_template(tok, hf, tmp_path):
    fast, hf_tok = hf
    records = [_chat(i) for i in range(20)]
    data = build(write(tmp_path, records), hf_tok)
    check_layout(data, all_train(data), fast.pad_token_id)
    assert data.report["format"] == "conversational prompt"
    for p in data.train_prompts.prompts + data.heldout:
        messages = records[p.line - 1]["prompt"]
        out = fast.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert p.ids == list(out["input_ids"])
        assert p.text == fast.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert p.text.endswith("<|im_start|>assistant\n")

    data = build(write(tmp_path, records, "sp.jsonl"), tok)
    for p in data.train_prompts.prompts:
        messages = records[p.line - 1]["prompt"]
        assert p.ids == tok.apply_chat_template(messages, add_generation_prompt=True)
        assert p.text == tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )


def test_truncation_keeps_the_end_and_is_counted(tok, tmp_path):
    records = [_q(i) for i in range(20)]
    records += [{"prompt": "the red fox sat on the mat and " * (i + 2) + f"{i}?"} for i in range(5)]
    full = {i + 1: tok.encode(r["prompt"], add_special_tokens=True) for i, r in enumerate(records)}
    limit = max(len(full[line]) for line in range(1, 21))  # the long prompts are cut
    cut = sum(len(ids) > limit for ids in full.values())
    assert cut == 5
    data = build(write(tmp_path, records), tok, max_prompt_len=limit)
    assert data.report["truncated_prompts"] == cut
    assert f"{cut} cut to their last {limit} tokens" in data.description
    assert data.width == limit
    for p in data.train_prompts.prompts + data.heldout:
        assert p.ids == full[p.line][-limit:]
        assert p.text == records[p.line - 1]["prompt"]  # reward functions see the whole prompt
    check_layout(data, all_train(data), tok.pad_id)


def test_fields_reach_fields_of_in_order(tok, tmp_path):
    records = []
    for i in range(24):
        rec = {"prompt": f"what is {i}?", "answer": str(i)}
        if i % 3 == 0:
            rec["meta"] = {"source": "gsm", "tags": [i]}
        if i % 4 == 0:
            rec["completion"] = f" {i}"  # other formats' keys are fields too
        records.append(rec)
    data = build(write(tmp_path, records), tok, batch_size=4, heldout_fraction=0.2)
    assert data.report["fields"] == ["answer", "meta", "completion"]
    for split, prompts, batch in [
        ("train", data.train_prompts.prompts, next(data.train)),
        ("heldout", data.heldout, next(data.heldout_batches(3))),
    ]:
        fields = data.fields_of(split, batch["index"])
        assert list(fields) == ["answer", "meta", "completion"]
        recs = [records[prompts[i].line - 1] for i in batch["index"]]
        for name in fields:
            assert fields[name] == [r.get(name) for r in recs]
    index = [i for i, p in enumerate(data.train_prompts.prompts) if "meta" in p.fields][:1]
    fields = data.fields_of("train", np.asarray(index, np.int32))
    fields["meta"][0]["tags"].append("changed")  # a reward function's edit stays its own
    assert data.fields_of("train", index) != fields
    with pytest.raises(ValueError, match="split='test' is unknown"):
        data.fields_of("test", [0])


def test_width_covers_held_out_prompts(tok, tmp_path):
    short = [_q(i) for i in range(30)]
    for k in range(40):  # a long prompt whose hash lands it in the held-out split
        long = {"prompt": f"{k} " + "the red fox sat on the mat and ran " * 3, "answer": "x"}
        data = build(write(tmp_path, [*short, long]), tok, heldout_fraction=0.2)
        if any(p.line == len(short) + 1 for p in data.heldout):
            break
    else:
        pytest.fail("no long prompt was held out")
    n = len(tok.encode(long["prompt"], add_special_tokens=True))
    assert data.width == n > max(len(p.ids) for p in data.train_prompts.prompts)
    assert data.report["width"] == n
    check_layout(data, next(data.train), tok.pad_id)
    batches = list(data.heldout_batches(4))
    assert all(b["tokens"].shape[1] == n for b in batches)
    assert sum(len(b["index"]) for b in batches) == len(data.heldout)


def test_heldout_split_is_stable_across_seeds_and_disjoint(tok, tmp_path):
    # Records repeating a prompt, with other answers or the same, land on its side.
    records = [_q(i) for i in range(30)] + [{**_q(i), "answer": "?"} for i in range(30)]
    records += [_q(i) for i in range(30, 50)]
    path = write(tmp_path, records)
    split = {}
    for seed in (0, 1):
        data = build(path, tok, seed=seed, heldout_fraction=0.1)
        train = {records[p.line - 1]["prompt"] for p in data.train_prompts.prompts}
        held = [records[p.line - 1]["prompt"] for p in data.heldout]
        assert held and not train & set(held) and len(train | set(held)) == 50
        assert len(data.train_prompts) + len(data.heldout) == 80
        assert len(set(held)) == 5
        split[seed] = sorted(held)
    assert split[0] == split[1]


def test_resume_gives_the_same_next_batches(tok, tmp_path):
    path = write(tmp_path, [_q(i) for i in range(30)])
    new = lambda: build(path, tok, batch_size=4).train
    a = new()
    for _ in range(a.batches_per_epoch - 1):
        next(a)
    state = json.loads(json.dumps(a.state()))
    expect = [next(a) for _ in range(3)]  # crosses into the next epoch
    b = new()
    b.restore(state)
    for want in expect:
        got = next(b)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_resume_on_changed_data_is_refused(tok, tmp_path):
    a = build(write(tmp_path, [_q(i) for i in range(30)]), tok)
    state = a.train.state()
    b = build(write(tmp_path, [_q(i) for i in range(31)], "other.jsonl"), tok)
    assert b.fingerprint != a.fingerprint
    with pytest.raises(DataError, match=r"\(file changed since\)"):
        b.train.restore(state)
    c = build(write(tmp_path, [_q(i) for i in range(30)], "same.jsonl"), tok, max_prompt_len=8)
    with pytest.raises(DataError, match=r"\(settings changed since\)"):
        c.train.restore(state)
    d = build(write(tmp_path, [_q(i) for i in range(30)], "again.jsonl"), tok, strict=True)
    assert d.fingerprint == a.fingerprint  # neither the path nor strictness changes the batches
    d.train.restore(state)


def test_bad_records_are_counted_with_their_lines(tok, hf, tmp_path):
    bad = [
        "{not json",  # line 21
        '["a", "list"]',  # 22
        {"question": "x", "answer": "1"},  # 23
        {"prompt": 7},  # 24
        {"prompt": "   "},  # 25
        {"prompt": [_user("hi"), {"role": "wizard", "content": "x"}]},  # 26
        {"prompt": [{"role": "user"}]},  # 27
    ]
    data = build(write(tmp_path, [_q(i) for i in range(20)] + bad), tok)
    assert data.report["records"] == 27 and data.report["used"] == 20
    assert data.report["skipped"] == {
        "invalid JSON": {"count": 1, "lines": [21]},
        "not a JSON object": {"count": 1, "lines": [22]},
        "missing field": {"count": 2, "lines": [23, 27]},
        "mistyped field": {"count": 1, "lines": [24]},
        "empty prompt": {"count": 1, "lines": [25]},
        "unknown role": {"count": 1, "lines": [26]},
    }
    assert "7 records skipped: 2 missing field (lines 23, 27)" in data.description
    for line, problem in [
        (2, r":21: no prompt field \(has 'question', 'answer'\); give every record a prompt"),
        (3, r":21: 'prompt' is a number, not a string or messages; write the prompt as a str"),
        (4, r":21: the prompt is blank; give the record a prompt that is not blank"),
    ]:
        path = write(tmp_path, [_q(i) for i in range(20)] + [bad[line]], "strict.jsonl")
        with pytest.raises(DataError, match=problem):
            build(path, tok, strict=True)

    _, hf_tok = hf
    picky = HFTokenizer(hf_tok.files)
    picky.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    records = [_chat(i) for i in range(20)]
    records += [{"prompt": [{"role": "tool", "content": "4"}]}, {"prompt": []}]
    data = build(write(tmp_path, records, "chat.jsonl"), picky)
    assert data.report["skipped"] == {
        "chat template error": {"count": 1, "lines": [21]},
        "empty prompt": {"count": 1, "lines": [22]},
    }
    with pytest.raises(DataError, match=r":21: the chat template refused the messages: no tools"):
        build(write(tmp_path, records[:21], "chat.jsonl"), picky, strict=True)


def test_vocabulary_larger_than_the_model_is_refused(tok, tmp_path):
    path = write(tmp_path, [_q(i) for i in range(10)])
    with pytest.raises(
        DataError, match=r"outside the model's vocab_size=100 \(the tokenizer has 320"
    ):
        build(path, tok, vocab=100)


def test_unusable_inputs(tok, tmp_path):
    with pytest.raises(DataError, match=r"9 training prompts \(1 more held out\), fewer than one "):
        build(write(tmp_path, [_q(i) for i in range(10)]), tok, batch_size=64)
    with pytest.raises(DataError, match="no usable prompt"):
        build(write(tmp_path, ["{not json", {"answer": "1"}]), tok)
    with pytest.raises(DataError, match="only 1 distinct usable prompt"):
        build(write(tmp_path, [_q(1)] * 5), tok)
    with pytest.raises(DataError, match=r":6: a conversational prompt record in a file of prompt"):
        build(write(tmp_path, [_q(i) for i in range(5)] + [_chat(1)]), tok)
    no_template = Tokenizer(tok.proto)
    no_template.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        build(write(tmp_path, [_chat(i) for i in range(10)]), no_template)
    with pytest.raises(ConfigError, match="data.path is empty"):
        build_prompt_data(PromptDataConfig(), tok, 512)
    for bad, field in [
        ({"max_prompt_len": 0}, "max_prompt_len=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0"),
        ({"heldout_fraction": 0}, "heldout_fraction=0"),
    ]:
        with pytest.raises(ConfigError, match=f"data.{field}"):
            PromptDataConfig(path="x.jsonl", **bad)
