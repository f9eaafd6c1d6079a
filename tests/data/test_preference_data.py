"""Preference pairs: TRL's formats, implicit prompts, truncation, bad records, splits, resuming."""

import json

import numpy as np
import pytest

from llmjax.data import Tokenizer, TokenizerConfig
from llmjax.data.preference import (
    PreferenceDataConfig,
    build_preference_data,
    text_prompt_end,
)
from llmjax.errors import ConfigError, DataError

WORDS = ("red", "blue", "fox", "dog", "cat", "sat", "ran", "on", "the", "mat", "and", "big", "is")


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {i} + {i * 3} = {i * 4}" for i in range(3000)]
    lines += ["Question: what is", "Answer:", "User:", "Assistant:", "System:"] * 50
    return Tokenizer.train(iter(lines), TokenizerConfig(vocab_size=320))


def _pref(i):
    return {
        "prompt": f"Question: what is {i} plus {i}?\nAnswer:",
        "chosen": f" {2 * i}",
        "rejected": f" the red fox {i}",
    }


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def _conv(i):
    return {
        "prompt": [{"role": "system", "content": "Be brief."}, _user(f"What is {i} plus {i}?")],
        "chosen": [_assistant(f"It is {2 * i}.")],
        "rejected": [_assistant(f"The red fox {i}.")],
    }


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def build(path, tok, vocab=512, **settings):
    settings = {"seq_len": 64, "batch_size": 2, "heldout_fraction": 0.1, **settings}
    return build_preference_data(PreferenceDataConfig(path=str(path), **settings), tok, vocab)


def all_train(data):
    return data.train_pairs.rows(np.arange(len(data.train_pairs)))


def check_layout(batch, pad):
    """Per side: real tokens then padding; each slot predicts the next token of its own side."""
    B, _, T = batch["tokens"].shape
    assert batch["loss_mask"].shape == (B, 2, T) and batch["pair_index"].shape == (B,)
    for k in ("tokens", "targets", "positions", "segment_ids", "pair_index"):
        assert batch[k].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    for b in range(B):
        for s in (0, 1):
            seg = batch["segment_ids"][b, s]
            n = int(seg.sum())
            assert seg.tolist() == [1] * n + [0] * (T - n)
            assert batch["positions"][b, s].tolist() == list(range(n)) + [0] * (T - n)
            np.testing.assert_array_equal(
                batch["targets"][b, s, : n - 1], batch["tokens"][b, s, 1:n]
            )
            assert (batch["tokens"][b, s, n:] == pad).all()
            assert (batch["targets"][b, s, n - 1 :] == pad).all()
            mask = batch["loss_mask"][b, s]
            assert not mask[n - 1 :].any()
            on = np.flatnonzero(mask)
            assert len(on) and on[-1] == n - 2 and (np.diff(on) == 1).all()


def learned_text(tok, batch, b, s):
    targets = batch["targets"][b, s][batch["loss_mask"][b, s] == 1]
    return tok.decode(targets.tolist(), skip_special_tokens=False)


def test_prompt_chosen_rejected_strings(tok, tmp_path):
    records = [_pref(i) for i in range(30)]
    data = build(write(tmp_path, records), tok, seq_len=96)
    batch = all_train(data)
    check_layout(batch, tok.pad_id)
    assert data.report["train_pairs"] + data.report["heldout_pairs"] == 30
    assert data.report["truncated_prompts"] == data.report["truncated_completions"] == 0
    for b, i in enumerate(batch["pair_index"]):
        pair = data.train_pairs.pairs[i]
        rec = records[pair.line - 1]
        assert learned_text(tok, batch, b, 0) == rec["chosen"] + "</s>"
        assert learned_text(tok, batch, b, 1) == rec["rejected"] + "</s>"
        prompt = tok.encode(rec["prompt"], add_special_tokens=True)
        full = tok.encode(rec["prompt"] + rec["chosen"], add_special_tokens=True) + [tok.eos_id]
        assert pair.chosen == full and pair.prompt_ids == prompt == full[: pair.chosen_prompt_len]
        n = len(pair.rejected)
        assert batch["tokens"][b, 1, :n].tolist() == pair.rejected
        assert pair.rejected[: pair.rejected_prompt_len] == prompt


def test_conversational_explicit_prompt(tok, tmp_path):
    records = [_conv(i) for i in range(20)]
    data = build(write(tmp_path, records), tok, seq_len=128)
    batch = all_train(data)
    check_layout(batch, tok.pad_id)
    for b, i in enumerate(batch["pair_index"]):
        pair = data.train_pairs.pairs[i]
        rec = records[pair.line - 1]
        # Each reply with the eos that ends the turn and the newline the template writes after.
        assert learned_text(tok, batch, b, 0) == rec["chosen"][0]["content"] + "</s>\n"
        assert learned_text(tok, batch, b, 1) == rec["rejected"][0]["content"] + "</s>\n"
        prompt = tok.apply_chat_template(rec["prompt"], add_generation_prompt=True)
        assert pair.prompt_ids == prompt
        assert pair.chosen == tok.apply_chat_template(rec["prompt"] + rec["chosen"])


def test_implicit_prompt_of_messages(tok, tmp_path):
    records = []
    for i in range(20):
        shared = [_user(f"What is {i} plus {i}?")]
        if i % 2:  # a shared earlier exchange belongs to the prompt too
            shared = [_user("Hello."), _assistant("Hi."), *shared]
        records.append(
            {
                "chosen": [*shared, _assistant(f"It is {2 * i}.")],
                "rejected": [*shared, _assistant(f"The red fox {i}."), _user("Sure?")],
                "score": 1,
            }
        )
    data = build(write(tmp_path, records), tok, seq_len=128)
    assert data.report["format"] == "conversational chosen/rejected (implicit prompt)"
    batch = all_train(data)
    check_layout(batch, tok.pad_id)
    for b, i in enumerate(batch["pair_index"]):
        pair = data.train_pairs.pairs[i]
        rec = records[pair.line - 1]
        shared = rec["chosen"][:-1]
        assert pair.prompt_ids == tok.apply_chat_template(shared, add_generation_prompt=True)
        assert learned_text(tok, batch, b, 0) == rec["chosen"][-1]["content"] + "</s>\n"
        # Every message after the shared ones is the completion, the user's included.
        reply = rec["rejected"][-2]["content"]
        assert learned_text(tok, batch, b, 1) == f"{reply}</s>\nUser:\nSure?</s>\n"


def test_implicit_prompt_of_text_cuts_where_trl_does(tok, tmp_path):
    def split(chosen, rejected):
        cut = text_prompt_end(chosen, rejected)
        return chosen[:cut], chosen[cut:], rejected[cut:]

    # TRL's own example: the space before the first difference starts both completions.
    assert split("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert split("The sky is blue.", "The sky was blue.") == ("The sky", " is blue.", " was blue.")
    assert split("It costs 4.", "It costs 5.") == ("It costs", " 4.", " 5.")
    # One text a prefix of the other: TRL's cut falls before the shorter one's last character.
    assert split("It is 4", "It is 42") == ("It is ", "4", "42")
    assert text_prompt_end("blue sky", "green sky") == 0
    assert text_prompt_end(" blue", " green") == 0  # a leading space alone is no prompt

    records = [
        {
            "chosen": f"Question: what is {i}?\nAnswer: the red fox",
            "rejected": f"Question: what is {i}?\nAnswer: the big dog {i}",
        }
        for i in range(20)
    ]
    data = build(write(tmp_path, records), tok)
    batch = all_train(data)
    check_layout(batch, tok.pad_id)
    for b, i in enumerate(batch["pair_index"]):
        pair = data.train_pairs.pairs[i]
        n = pair.line - 1
        prompt = f"Question: what is {n}?\nAnswer: the"
        assert pair.prompt_ids == tok.encode(prompt, add_special_tokens=True)
        assert learned_text(tok, batch, b, 0) == " red fox</s>"
        assert learned_text(tok, batch, b, 1) == f" big dog {n}</s>"


def test_truncation_keeps_the_prompts_end_and_the_completions_start(tok, tmp_path):
    long_prompt = "Question: " + " ".join(f"the red fox {i}" for i in range(12)) + "\nAnswer:"
    long_completion = " " + " ".join(f"big dog {i}" for i in range(12))
    records = [_pref(i) for i in range(20)]
    records += [{"prompt": long_prompt, "chosen": " 4", "rejected": long_completion}]
    records += [{"prompt": "Question:", "chosen": long_completion, "rejected": " 5"}]
    T, P = 32, 12
    data = build(write(tmp_path, records), tok, seq_len=T, max_prompt_len=P, heldout_fraction=0.01)
    assert (data.report["truncated_prompts"], data.report["truncated_completions"]) == (21, 2)
    assert "21 with prompts cut to their last 12 tokens, 2 with completions cut to fit 32" in (
        data.description
    )
    everything = data.train_pairs.pairs + data.heldout.pairs
    pairs = {p.line: p for p in everything}
    prompt = tok.encode(long_prompt, add_special_tokens=True)
    completion = tok.encode(long_prompt + long_completion, add_special_tokens=True)[len(prompt) :]
    assert len(prompt) > P and len(completion) > T - P
    cut = pairs[21]
    assert cut.prompt_ids == prompt[-P:] and cut.chosen_prompt_len == cut.rejected_prompt_len == P
    assert cut.chosen == prompt[-P:] + tok.encode(" 4") + [tok.eos_id]
    assert cut.rejected == prompt[-P:] + completion[: T - P]
    short = tok.encode("Question:", add_special_tokens=True)
    assert pairs[22].chosen[: len(short)] == short and len(pairs[22].chosen) == T
    # Default: half of seq_len for the prompt.
    data = build(write(tmp_path, records[20:] * 2 + records[:6]), tok, seq_len=T)
    assert all(len(p.prompt_ids) <= T // 2 for p in data.train_pairs.pairs + data.heldout.pairs)
    batch = data.train_pairs.rows(np.arange(len(data.train_pairs)))
    check_layout(batch, tok.pad_id)


def test_identical_and_blank_completions_are_skipped(tok, tmp_path):
    prompt = "Question: what is 2 plus 2?\nAnswer:"
    same = " the red fox sat on the mat and the big dog"
    bad = [
        {"prompt": prompt, "chosen": " 4", "rejected": " 4"},  # line 21
        {"prompt": prompt, "chosen": same + " ran", "rejected": same + " sat"},  # 22: same once cut
        {"prompt": prompt, "chosen": "  ", "rejected": " 4"},  # 23
        {"prompt": prompt, "chosen": " 4", "rejected": ""},  # 24
    ]
    data = build(write(tmp_path, [_pref(i) for i in range(20)] + bad), tok, seq_len=24)
    assert data.report["skipped"] == {
        "identical completions": {"count": 2, "lines": [21, 22]},
        "empty completion": {"count": 2, "lines": [23, 24]},
    }
    assert "4 records skipped: 2 empty completion (lines 23, 24), 2 identical completions (li" in (
        data.description
    )
    assert data.report["records"] == 24 and data.report["used"] == 20
    for line, problem in [
        (0, r":21: chosen and rejected tokenize to the same \d+ ids; give chosen and rejected "),
        (1, r":21: chosen and rejected are the same once cut to seq_len=24 tokens"),
        (2, r":21: the chosen completion is blank; give chosen and rejected each a completion"),
    ]:
        path = write(tmp_path, [_pref(i) for i in range(20)] + [bad[line]], "strict.jsonl")
        with pytest.raises(DataError, match=problem):
            build(path, tok, seq_len=24, strict=True)


def test_bad_records_are_counted_with_their_lines(tok, tmp_path):
    bad = [
        "{not json",  # line 21
        '["a", "list"]',  # 22
        {"prompt": "What is 1?", "chosen": " 1"},  # 23: missing rejected
        {"prompt": "What is 1?", "chosen": 1, "rejected": " 2"},  # 24
        {"question": "x"},  # 25
    ]
    data = build(write(tmp_path, [_pref(i) for i in range(20)] + bad), tok)
    assert data.report["skipped"] == {
        "invalid JSON": {"count": 1, "lines": [21]},
        "not a JSON object": {"count": 1, "lines": [22]},
        "missing field": {"count": 2, "lines": [23, 25]},
        "mistyped field": {"count": 1, "lines": [24]},
    }
    with pytest.raises(DataError, match=r":21: a prompt/chosen/rejected record without 'rejec"):
        build(write(tmp_path, [_pref(i) for i in range(20)] + bad[2:3]), tok, strict=True)

    shared = [_user("What is 2 plus 2?")]
    good = [
        {
            "chosen": [_user(f"What is {i}?"), _assistant("It is.")],
            "rejected": [_user(f"What is {i}?"), _assistant("No.")],
        }
        for i in range(20)
    ]
    bad = [
        {"chosen": [_user("a"), _assistant("b")], "rejected": [_user("c"), _assistant("b")]},
        {"chosen": [*shared, _assistant("4")], "rejected": [*shared, _user("4")]},
        {"chosen": [*shared, _assistant("4")], "rejected": shared},
        {"chosen": [*shared, _assistant("4")], "rejected": [*shared, _assistant("4")]},
        {"chosen": [*shared, {"role": "wizard", "content": "4"}], "rejected": shared},
        {"chosen": [*shared, _assistant(" ")], "rejected": [*shared, _assistant("5")]},
    ]
    data = build(write(tmp_path, good + bad), tok, seq_len=96)
    assert data.report["skipped"] == {
        "no common prompt": {"count": 1, "lines": [21]},
        "no assistant message": {"count": 1, "lines": [22]},
        "empty completion": {"count": 2, "lines": [23, 26]},
        "identical completions": {"count": 1, "lines": [24]},
        "unknown role": {"count": 1, "lines": [25]},
    }
    with pytest.raises(DataError, match=r":21: chosen and rejected start with different messa"):
        build(write(tmp_path, good + bad[:1]), tok, seq_len=96, strict=True)
    with pytest.raises(
        DataError,
        match=r":21: after the messages both sides share, 'rejected' goes on with a user me",
    ):
        build(write(tmp_path, good + bad[1:2]), tok, seq_len=96, strict=True)


def test_mixed_formats_are_refused(tok, tmp_path):
    records = [_pref(i) for i in range(5)] + [{"chosen": "a b", "rejected": "a c"}]
    with pytest.raises(
        DataError, match=r"data.jsonl:6: a chosen/rejected \(implicit prompt\) record in a file "
    ):
        build(write(tmp_path, records), tok)
    records = [_pref(i) for i in range(5)] + [_conv(1)]
    with pytest.raises(DataError, match=r":6: a conversational prompt/chosen/rejected record"):
        build(write(tmp_path, records), tok)


def test_heldout_split_is_stable_across_seeds_and_disjoint(tok, tmp_path):
    # Duplicates of a held-out record are held out with it.
    records = [_pref(i) for i in range(30)] * 2 + [_pref(i) for i in range(30, 50)]
    path = write(tmp_path, records)
    split = {}
    for seed in (0, 1):
        data = build(path, tok, seed=seed, heldout_fraction=0.1)
        train = {json.dumps(records[p.line - 1]) for p in data.train_pairs.pairs}
        held = [json.dumps(records[p.line - 1]) for p in data.heldout.pairs]
        assert held and not train & set(held) and len(train | set(held)) == 50
        assert len(data.train_pairs) + len(data.heldout) == 80
        split[seed] = sorted(held)
    assert split[0] == split[1]


def test_pair_index_points_at_its_pair(tok, tmp_path):
    data = build(write(tmp_path, [_pref(i) for i in range(40)]), tok, heldout_fraction=0.2)
    for split, batches in [
        (data.train_pairs.pairs, [next(data.train) for _ in range(5)]),
        (data.heldout.pairs, list(data.heldout.batches(3))),
    ]:
        for batch in batches:
            for b, i in enumerate(batch["pair_index"]):
                pair = split[i]
                for s, ids in enumerate((pair.chosen, pair.rejected)):
                    assert batch["tokens"][b, s, : len(ids)].tolist() == ids
    sizes = [len(b["pair_index"]) for b in data.heldout.batches(3)]
    assert sizes == [3, 3, 2] and len(data.heldout) == 8
    assert [b["pair_index"].tolist() for b in data.heldout.batches(3, max_batches=1)] == [[0, 1, 2]]


def test_resume_gives_the_same_next_batches(tok, tmp_path):
    path = write(tmp_path, [_pref(i) for i in range(30)])
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
    a = build(write(tmp_path, [_pref(i) for i in range(30)]), tok)
    state = a.train.state()
    b = build(write(tmp_path, [_pref(i) for i in range(31)], "other.jsonl"), tok)
    assert b.fingerprint != a.fingerprint
    with pytest.raises(DataError, match=r"\(file changed since\)"):
        b.train.restore(state)
    c = build(write(tmp_path, [_pref(i) for i in range(30)], "same.jsonl"), tok, max_prompt_len=8)
    with pytest.raises(DataError, match=r"\(settings changed since\)"):
        c.train.restore(state)
    d = build(write(tmp_path, [_pref(i) for i in range(30)], "again.jsonl"), tok)
    assert d.fingerprint == a.fingerprint  # the path is not part of the data
    d.train.restore(state)


def test_vocabulary_larger_than_the_model_is_refused(tok, tmp_path):
    path = write(tmp_path, [_pref(i) for i in range(10)])
    with pytest.raises(
        DataError, match=r"outside the model's vocab_size=100 \(the tokenizer has 320"
    ):
        build(path, tok, vocab=100)


def test_unusable_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="training pairs .* fewer than one batch of data.batch_si"):
        build(write(tmp_path, [_pref(i) for i in range(10)]), tok, batch_size=64)
    with pytest.raises(DataError, match="no usable preference pair"):
        build(write(tmp_path, ["{not json", {"prompt": "x", "chosen": " a"}]), tok)
    no_template = Tokenizer(tok.proto)
    no_template.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        build(write(tmp_path, [_conv(i) for i in range(10)]), no_template)
    with pytest.raises(ConfigError, match="data.path is empty"):
        build_preference_data(PreferenceDataConfig(), tok, 512)
    for bad, field in [
        ({"seq_len": 1}, "seq_len=1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0"),
        ({"max_prompt_len": 64}, "max_prompt_len=64: .* below data.seq_len=64"),
        ({"max_prompt_len": -1}, "max_prompt_len=-1"),
    ]:
        with pytest.raises(ConfigError, match=f"data.{field}"):
            PreferenceDataConfig(path="x.jsonl", **{"seq_len": 64, **bad})


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A byte-level BPE with a ChatML template, as transformers saves it, and as llmjax opens it."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llmjax.data.hf_tokenizer import open_tokenizer

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(0)
    bpe.train_from_iterator([" ".join(rng.choice(WORDS, 8)) for _ in range(2000)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("hf_tokenizer")
    fast.save_pretrained(path)
    return fast, open_tokenizer(path)


def test_hf_ids_are_transformers_ids(hf, tmp_path):
    fast, tok = hf
    records = [_conv(i) for i in range(12)]
    data = build(write(tmp_path, records), tok, seq_len=128)
    batch = all_train(data)
    check_layout(batch, tok.pad_id)

    def render(messages, generation_prompt=False):
        out = fast.apply_chat_template(
            messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True
        )
        return list(out["input_ids"])

    for b, i in enumerate(batch["pair_index"]):
        pair = data.train_pairs.pairs[i]
        rec = records[pair.line - 1]
        assert pair.prompt_ids == render(rec["prompt"], True)
        assert pair.chosen == render(rec["prompt"] + rec["chosen"])
        assert pair.rejected == render(rec["prompt"] + rec["rejected"])
        assert learned_text(tok, batch, b, 1) == rec["rejected"][0]["content"] + "<|im_end|>\n"

    # Implicit text prompts: each side as TRL tokenizes prompt + completion + eos text.
    records = [
        {"chosen": f"the red fox {i} sat", "rejected": f"the red fox {i} ran"} for i in range(12)
    ]
    data = build(write(tmp_path, records, "text.jsonl"), tok)
    for pair in data.train_pairs.pairs:
        rec = records[pair.line - 1]
        assert pair.chosen == fast(rec["chosen"] + fast.eos_token)["input_ids"]
        assert pair.rejected == fast(rec["rejected"] + fast.eos_token)["input_ids"]
        assert pair.prompt_ids == fast(rec["chosen"][: -len(" sat")])["input_ids"]
