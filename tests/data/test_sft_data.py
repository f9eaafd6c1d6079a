"""Supervised fine-tuning data: TRL's record formats, loss masks, packing, resuming, bad records."""

import json

import jax
import numpy as np
import pytest

import llmjax
from llmjax.data import Tokenizer, TokenizerConfig
from llmjax.data.sft import SFTDataConfig, build_sft_data, pack_best_fit
from llmjax.errors import ConfigError, DataError

WORDS = ("red", "blue", "fox", "dog", "cat", "sat", "ran", "on", "the", "mat", "and", "big", "is")


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) + f" {i} + {i * 3} = {i * 4}" for i in range(3000)]
    lines += ["Question: what is", "Answer:", "User:", "Assistant:", "System:"] * 50
    return Tokenizer.train(iter(lines), TokenizerConfig(vocab_size=320))


def _pc(i):
    return {"prompt": f"What is {i} plus {i + 1}?\nAnswer:", "completion": f" {2 * i + 1}"}


def _chat(i, turns=2):
    messages = [{"role": "system", "content": "Be brief."}]
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"What is {i} plus {t}?"},
            {"role": "assistant", "content": f"It is {i + t}."},
        ]
    return {"messages": messages}


def write(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def build(path, tok, vocab=512, **settings):
    settings = {"seq_len": 64, "batch_size": 2, "heldout_fraction": 0.1, **settings}
    return build_sft_data(SFTDataConfig(path=str(path), **settings), tok, vocab)


def all_rows(data):
    rows = data.train.rows
    return rows.rows(np.arange(len(rows)))


def segments(batch):
    """Each example of a batch: (its input tokens, its targets, its loss mask)."""
    for b in range(len(batch["tokens"])):
        seg = batch["segment_ids"][b]
        for s in range(1, seg.max() + 1):
            at = seg == s
            np.testing.assert_array_equal(batch["positions"][b][at], np.arange(at.sum()))
            yield batch["tokens"][b][at], batch["targets"][b][at], batch["loss_mask"][b][at]


def learned(batch):
    """The learned target ids of each example, as tuples (runs split where the mask drops)."""
    out = []
    for _, targets, mask in segments(batch):
        runs, run = [], []
        for t, m in zip(targets, mask, strict=True):
            if m:
                run.append(int(t))
            elif run:
                runs.append(tuple(run))
                run = []
        out.append(runs + ([tuple(run)] if run else []))
    return out


def check_invariants(batch):
    """Targets are the next token of the same example; padding and example ends learn nothing."""
    seg, mask = batch["segment_ids"], batch["loss_mask"]
    assert set(batch) == {"tokens", "targets", "positions", "segment_ids", "loss_mask"}
    assert all(
        batch[k].dtype == np.int32 for k in ("tokens", "targets", "positions", "segment_ids")
    )
    assert mask.dtype == np.float32
    assert not mask[seg == 0].any()
    same = np.zeros_like(mask, bool)
    same[:, :-1] = seg[:, 1:] == seg[:, :-1]
    assert not mask[~same].any(), "a loss target crosses into another example or padding"
    np.testing.assert_array_equal(
        batch["targets"][:, :-1][same[:, :-1]], batch["tokens"][:, 1:][same[:, :-1]]
    )


def test_prompt_completion_learns_the_completion_and_eos(tok, tmp_path):
    records = [_pc(i) for i in range(40)]
    data = build(write(tmp_path, records), tok, packing=False)
    batch = all_rows(data)
    check_invariants(batch)
    expect = {}
    for r in records:
        prompt = tok.encode(r["prompt"], add_special_tokens=True)
        full = tok.encode(r["prompt"] + r["completion"], add_special_tokens=True) + [tok.eos_id]
        assert full[: len(prompt)] == prompt  # this tokenizer never merges across the boundary
        expect[tuple(full)] = [tuple(full[len(prompt) :])]
    seen = 0
    for (tokens, _, _), runs in zip(segments(batch), learned(batch), strict=True):
        assert runs == expect[tuple(tokens)]
        assert runs[0][-1] == tok.eos_id
        seen += 1
    assert seen == data.report["train_records"] == 36
    assert len(data.heldout.examples) == data.report["heldout_records"] == 4
    for prompt_ids, completion_ids in data.heldout.examples:
        assert tuple(prompt_ids + completion_ids) in expect
        assert completion_ids[-1] == tok.eos_id and prompt_ids[0] == tok.bos_id


@pytest.mark.parametrize("text", [True, False])
def test_text_and_full_loss_learn_every_token(tok, tmp_path, text):
    # Text records (extra keys ignored), or prompt/completion without completion-only loss.
    records = [{"text": f"the red fox {i} sat", "id": i} if text else _pc(i) for i in range(20)]
    data = build(write(tmp_path, records), tok, completion_only_loss=text)
    for tokens, targets, mask in segments(all_rows(data)):
        assert tokens[0] == tok.bos_id and targets[len(tokens) - 2] == tok.eos_id
        assert mask.tolist() == [1.0] * (len(tokens) - 1) + [0.0]
    assert len(data.heldout.examples) == (0 if text else data.report["heldout_records"])


def test_messages_learn_only_assistant_turns(tok, tmp_path):
    records = [_chat(i) for i in range(20)]
    data = build(write(tmp_path, records), tok, seq_len=128)
    batch = all_rows(data)
    check_invariants(batch)
    by_ids = {tuple(tok.apply_chat_template(r["messages"])): r for r in records}
    for (tokens, _, _), runs in zip(segments(batch), learned(batch), strict=True):
        replies = [
            m["content"] for m in by_ids[tuple(tokens)]["messages"] if m["role"] == "assistant"
        ]
        # Each reply with the eos that ends the turn (and the newline the template writes after).
        assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
            f"{c}</s>\n" for c in replies
        ]
    prompt_ids, completion_ids = data.heldout.examples[0]
    assert tok.decode(prompt_ids, skip_special_tokens=False).endswith("Assistant:\n")
    assert tok.decode(completion_ids, skip_special_tokens=False).startswith("It is")


def test_conversational_prompt_completion(tok, tmp_path):
    records = [
        {
            "prompt": [{"role": "user", "content": f"What is {i} plus one?"}],
            "completion": [{"role": "assistant", "content": f"It is {i + 1}."}],
        }
        for i in range(20)
    ]
    data = build(write(tmp_path, records), tok)
    runs = learned(all_rows(data))
    assert all(len(r) == 1 for r in runs)
    texts = {tok.decode(r[0], skip_special_tokens=False) for r in runs}
    assert texts <= {f"It is {i + 1}.</s>\n" for i in range(20)} and len(texts) == 18


def test_packed_rows_keep_examples_apart(tok, tmp_path):
    records = [_pc(i) for i in range(200)]
    packed = build(write(tmp_path, records), tok, seq_len=128)
    single = build(write(tmp_path, records), tok, seq_len=128, packing=False)
    batch = all_rows(packed)
    check_invariants(batch)
    assert batch["segment_ids"].max() > 2  # several examples per row
    assert packed.report["rows"] < single.report["rows"] == single.report["train_records"]
    assert packed.report["fill"] > 0.85
    # Each training example is in exactly one row, whole, with the same mask as unpacked.
    key = lambda b: sorted((tuple(t), tuple(m)) for t, _, m in segments(b))
    assert key(batch) == key(all_rows(single))


def test_best_fit_decreasing():
    lengths = [6, 5, 3, 2, 2, 8, 1]
    rows = pack_best_fit(lengths, 8, range(len(lengths)))
    assert rows == [[5], [0, 3], [1, 2], [4, 6]]
    assert pack_best_fit(lengths, 8, range(len(lengths))) == rows


def test_padding_and_packing_leave_logits_unchanged(tok, tmp_path):
    model = llmjax.build("llama3-tiny")
    # Random weights of unit scale; model.init would take longer than the rest of this file.
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda a: np.float32(
            rng.normal(0, a.shape[0] ** -0.5 if a.ndim > 1 else 0, a.shape) + (a.ndim == 1)
        ),
        model.abstract_params(),
    )
    apply = jax.jit(lambda p, t, pos, seg: model.apply(p, t, positions=pos, segment_ids=seg))
    data = build(write(tmp_path, [_pc(i) for i in range(30)]), tok, seq_len=64)
    batch = data.train.rows.rows([0])
    seg = batch["segment_ids"][0]
    assert (seg == 0).any() and seg.max() >= 2
    # Each example alone at the start of a row of its own, followed by other tokens that causal
    # attention keeps from mattering: no segment ids, no padding.
    n, T = seg.max(), len(seg)
    alone = rng.integers(4, tok.vocab_size, (n, T)).astype(np.int32)
    for s in range(n):
        example = batch["tokens"][0][seg == s + 1]
        alone[s, : len(example)] = example
    packed = apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    ref = apply(params, alone, np.tile(np.arange(T, dtype=np.int32), (n, 1)), np.ones_like(alone))
    for s in range(n):
        at = seg == s + 1
        np.testing.assert_allclose(packed[0, at], ref[s, : at.sum()], atol=2e-5, rtol=2e-5)


def test_resume_gives_the_same_next_batches(tok, tmp_path):
    path = write(tmp_path, [_pc(i) for i in range(60)])
    new = lambda: build(path, tok, seq_len=32, packing=False, batch_size=4).train
    a = new()
    per_epoch = a.batches_per_epoch
    for _ in range(per_epoch - 1):
        next(a)
    state = json.loads(json.dumps(a.state()))
    expect = [next(a) for _ in range(3)]  # crosses into the next epoch
    b = new()
    b.restore(state)
    for want in expect:
        got = next(b)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    # Each epoch is reshuffled.
    c = new()
    first = [next(c)["tokens"] for _ in range(per_epoch)]
    second = [next(c)["tokens"] for _ in range(per_epoch)]
    assert not all(np.array_equal(x, y) for x, y in zip(first, second, strict=True))
    # Rows of each global batch for this process only.
    d = new()
    d.local_rows = slice(2, 4)
    np.testing.assert_array_equal(next(d)["tokens"], first[0][2:4])


def test_resume_on_changed_data_is_refused(tok, tmp_path):
    a = build(write(tmp_path, [_pc(i) for i in range(40)]), tok)
    state = a.train.state()
    b = build(write(tmp_path, [_pc(i) for i in range(41)], "other.jsonl"), tok)
    assert b.fingerprint != a.fingerprint
    with pytest.raises(DataError, match=r"\(file changed since\)"):
        b.train.restore(state)
    c = build(write(tmp_path, [_pc(i) for i in range(40)], "same.jsonl"), tok, seed=1)
    with pytest.raises(DataError, match=r"\(settings changed since\)"):
        c.train.restore(state)


def test_heldout_records_are_never_trained_on(tok, tmp_path):
    # Duplicates of a held-out record are held out with it.
    records = [_pc(i) for i in range(30)] * 2 + [_pc(i) for i in range(30, 50)]
    data = build(write(tmp_path, records), tok, heldout_fraction=0.01)
    train = {tuple(t) for t, _, _ in segments(all_rows(data))}
    held = [tuple(t) for b in data.heldout.batches(3) for t, _, _ in segments(b)]
    assert held and not train & set(held)
    assert data.report["heldout_records"] == len(held) >= 1
    assert data.report["train_records"] + len(held) == len(records)
    sizes = [len(b["tokens"]) for b in data.heldout.batches(1, max_batches=1)]
    assert sizes == [1]


def test_same_seed_same_batches_other_seed_other_order(tok, tmp_path):
    path = write(tmp_path, [_pc(i) for i in range(80)])
    first = lambda seed: [next(build(path, tok, seed=seed).train)["tokens"] for _ in range(1)]
    np.testing.assert_array_equal(first(0)[0], first(0)[0])
    assert not np.array_equal(first(0)[0], first(1)[0])
    assert build(path, tok).fingerprint == build(path, tok).fingerprint


BAD = [
    "{not json",  # line 1
    '["a", "list"]',  # 2
    {"prompt": "x"},  # 3: missing completion
    {"prompt": "What is 1 plus 2?", "completion": 3},  # 4: mistyped
    {"prompt": "What is 1 plus 2?", "completion": "  "},  # 5: empty completion
    {"prompt": "the red fox " * 40, "completion": " sat"},  # 6: over length
    {"question": "x"},  # 7: missing field
]


def test_bad_records_are_counted_with_their_lines(tok, tmp_path):
    records = BAD + [_pc(i) for i in range(30)] + [{"prompt": "red " * 50, "completion": " a"}]
    data = build(write(tmp_path, records), tok, seq_len=48)
    skipped = data.report["skipped"]
    assert skipped == {
        "invalid JSON": {"count": 1, "lines": [1]},
        "not a JSON object": {"count": 1, "lines": [2]},
        "missing field": {"count": 2, "lines": [3, 7]},
        "mistyped field": {"count": 1, "lines": [4]},
        "empty completion": {"count": 1, "lines": [5]},
        "over length": {"count": 2, "lines": [6, 38]},
    }
    assert (
        "; 8 records skipped: 2 missing field (lines 3, 7), 2 over 48 tokens (lines 6, 38), "
        "1 invalid JSON (line 1), 1 not a JSON object (line 2), 1 mistyped field (line 4), "
        "1 empty completion (line 5); "
    ) in data.description
    assert data.report["records"] == 38 and data.report["used"] == 30


@pytest.mark.parametrize(
    "line, problem",
    [
        (0, r":1: not valid JSON .*write one JSON object per line"),
        (2, r":3: a prompt/completion record without 'completion'; give every record"),
        (3, r":4: 'completion' is a number, not a string"),
        (4, r":5: the completion is blank; give the record a completion"),
        (5, r":6: the record is \d+ tokens, longer than seq_len=48; raise data.seq_len"),
    ],
)
def test_strict_mode_stops_at_the_first_bad_record(tok, tmp_path, line, problem):
    path = write(tmp_path, [_pc(i) for i in range(line)] + [BAD[line]] + [_pc(50)] * 3)
    with pytest.raises(DataError, match=problem):
        build(path, tok, seq_len=48, strict=True)


def test_bad_conversations(tok, tmp_path):
    chats = [_chat(i) for i in range(20)]
    bad = [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ["hi"]}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
    ]
    data = build(write(tmp_path, chats + bad), tok, seq_len=128)
    assert data.report["skipped"] == {
        "no assistant message": {"count": 1, "lines": [21]},
        "unknown role": {"count": 1, "lines": [22]},
        "mistyped field": {"count": 1, "lines": [23]},
        "empty conversation": {"count": 1, "lines": [24]},
        "empty completion": {"count": 1, "lines": [25]},
    }
    # Without completion-only loss a conversation without a reply is still text to learn.
    data = build(write(tmp_path, chats + bad[:1]), tok, seq_len=128, completion_only_loss=False)
    assert data.report["skipped"] == {}
    with pytest.raises(DataError, match=r":21: .*unknown role 'wizard'; use one of the roles"):
        build(write(tmp_path, chats + bad[1:2]), tok, seq_len=128, strict=True)


def test_mixed_formats_are_refused(tok, tmp_path):
    records = [_pc(i) for i in range(5)] + [{"text": "the fox"}] + [_chat(1)]
    with pytest.raises(DataError, match=r"data.jsonl:6: a text record in a file of prompt/comp"):
        build(write(tmp_path, records), tok)


def test_vocabulary_larger_than_the_model_is_refused(tok, tmp_path):
    path = write(tmp_path, [{"text": f"the red fox {i}"} for i in range(4)])
    with pytest.raises(
        DataError, match=r"outside the model's vocab_size=100 \(the tokenizer has 320"
    ):
        build(path, tok, vocab=100)


def test_unusable_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="no usable record"):
        build(write(tmp_path, BAD[:5]), tok)
    with pytest.raises(DataError, match="at least two"):
        build(write(tmp_path, [_pc(1)] * 5), tok)
    with pytest.raises(DataError, match="fewer than one batch of data.batch_size=64"):
        build(write(tmp_path, [_pc(i) for i in range(10)]), tok, batch_size=64)
    with pytest.raises(DataError, match="not a .jsonl file"):
        build(tmp_path / "data.json", tok)
    with pytest.raises(DataError, match="no such file"):
        build(tmp_path / "missing.jsonl", tok)
    with pytest.raises(ConfigError, match="data.path is empty"):
        build_sft_data(SFTDataConfig(), tok, 512)
    with pytest.raises(ConfigError, match="heldout_fraction=0"):
        SFTDataConfig(path="x.jsonl", heldout_fraction=0)


class _Templated:
    """``tok`` with another chat template."""

    def __init__(self, tok, template):
        self._tok, self.chat_template = tok, template

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        return self._tok.apply_chat_template(
            messages, add_generation_prompt, tokenize, chat_template=self.chat_template
        )


def test_templates_that_are_not_prefix_consistent_are_refused(tok, tmp_path):
    # Marks the last message: a turn renders differently once another follows it.
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if loop.last %} END{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    path = write(tmp_path, [_chat(i) for i in range(10)])
    with pytest.raises(DataError, match=r"data.jsonl:1: the chat template does not render"):
        build(path, _Templated(tok, template), seq_len=128)
    data = build(path, _Templated(tok, template), seq_len=128, completion_only_loss=False)
    assert data.report["used"] == 10
    with pytest.raises(DataError, match="has no chat template"):
        build(path, _Templated(tok, None), seq_len=128)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
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


def test_hf_prompt_completion_ids_are_transformers_ids(hf, tmp_path):
    fast, tok = hf
    records = [_pc(i) for i in range(20)]
    data = build(write(tmp_path, records), tok)
    expect = {}
    for r in records:
        # TRL appends the eos token's text to the completion, then tokenizes prompt + completion.
        full = fast(r["prompt"] + r["completion"] + fast.eos_token)["input_ids"]
        expect[tuple(full)] = tuple(full[len(fast(r["prompt"])["input_ids"]) :])
    batch = all_rows(data)
    check_invariants(batch)
    for (tokens, _, _), runs in zip(segments(batch), learned(batch), strict=True):
        assert runs == [expect[tuple(tokens)]]


def test_hf_messages_mask_is_transformers_assistant_mask(hf, tmp_path):
    fast, tok = hf
    records = [_chat(i, turns=1 + i % 3) for i in range(20)]
    data = build(write(tmp_path, records), tok, seq_len=160)
    expect = {}
    for r in records:
        out = fast.apply_chat_template(
            r["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        expect[tuple(out["input_ids"])] = out["assistant_masks"]
    batch = all_rows(data)
    check_invariants(batch)
    for tokens, _, mask in segments(batch):
        # Slot j learns token j + 1 when transformers marks that token as the assistant's.
        assert mask.tolist() == [float(m) for m in expect[tuple(tokens)][1:]] + [0.0]
    assert len(list(segments(batch))) == data.report["train_records"]
