"""HFTokenizer and open_tokenizer against transformers, on tokenizers built inside the tests."""

import io
import json
import random
import shutil

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from llmjax.data import DataError, Tokenizer, TokenizerConfig
from llmjax.data.hf_tokenizer import HFTokenizer, open_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = (
    "the model reads tokens and writes text while users ask questions about code data "
    "naïve café über straße 東京 中文 字符 привет мир ελληνικά 🙂 👍 def return import 42 3.14 "
    "system user assistant hello world"
)

TEXTS = [
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand  double  spaces",
    "naïve café über straße 東京 中文 привет 🙂👍",
    "def f(x):\n    return x + 42  # 3.14\n",
    "a word never seen: zyxwvq, QQQ!!",
    "",
    " ",
    "\n",
    "e\u0301 combining and \u00e9 precomposed",
]


def corpus(n=400, seed=0):
    rng, words = random.Random(seed), WORDS.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(n)]


def train_bpe(style: str, specials: list[str]) -> RawTokenizer:
    """A small tokenizer: BPE over bytes (``bytelevel``, as Llama 3 and Qwen), BPE over
    ``metaspace`` words (Llama 2, Gemma) or ``unigram`` (T5)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style == "bytelevel" else []
    if style == "unigram":
        tok = RawTokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=500, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    else:
        tok = RawTokenizer(models.BPE(unk_token=None if alphabet else "<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
    if style == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus() + TEXTS, trainer)
    return tok


def save_hf(directory, raw, template=None, generation_eos=None, **special):
    """``raw`` wrapped and written by transformers itself, as a model repository holds it."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, **special)
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(directory)
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": generation_eos})
        )
    return directory


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>"]
    specials += ["<|end_header_id|>", "<|eot_id|>"]
    raw = train_bpe("bytelevel", specials)
    d = tmp_path_factory.mktemp("llama3")
    return save_hf(
        d,
        raw,
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}<|eot_id|>{% endfor %}",
        generation_eos=[raw.token_to_id("<|end_of_text|>"), raw.token_to_id("<|eot_id|>")],
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        additional_special_tokens=specials[2:],
    )


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    raw = train_bpe("metaspace", ["<pad>", "<eos>", "<bos>", "<unk>"])
    d = tmp_path_factory.mktemp("gemma")
    fast_kwargs = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    save_hf(d, raw, add_bos_token=True, **fast_kwargs)
    # Added after the fact, as fine-tuned models do: one special, one plain control token.
    hf = transformers.AutoTokenizer.from_pretrained(d)
    hf.add_tokens([transformers.AddedToken("<start_of_turn>", special=True, normalized=False)])
    hf.add_tokens(["[TOOL]", transformers.AddedToken("<mask>", lstrip=True, rstrip=True)])
    hf.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    # Unigram, eos appended by the config's flag, and the clean-up of spaces before punctuation
    # that transformers applies to every model but BPE.
    raw = train_bpe("unigram", ["<pad>", "</s>", "<unk>"])
    d = tmp_path_factory.mktemp("t5")
    save_hf(d, raw, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", add_eos_token=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(clean_up_tokenization_spaces=True, add_eos_token=True)
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def hf_ids(hf, text, add_special_tokens=False):
    return hf(text, add_special_tokens=add_special_tokens)["input_ids"]


@pytest.mark.parametrize("name", ["llama3_dir", "gemma_dir", "t5_dir"])
def test_encode_decode_match_transformers(name, request):
    d = request.getfixturevalue(name)
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = open_tokenizer(d)
    assert isinstance(tok, HFTokenizer)
    specials = [t for t in hf.get_added_vocab() if t not in ("<unk>",)]
    texts = TEXTS + [f"before{s}after {s} x" for s in specials] + ["<start_of_turn>user\n[TOOL]x"]
    texts += ["Is it ? Yes , it is . I 'm sure they 've done it ! ", "a  <mask>  b"]
    for text in texts:
        for add in (False, True):
            assert tok.encode(text, add_special_tokens=add) == hf_ids(hf, text, add), (text, add)
        ids = hf_ids(hf, text, True)
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    assert tok.encode_batch(texts, add_special_tokens=True) == [hf_ids(hf, t, True) for t in texts]
    assert tok.vocab_size == len(hf)
    assert max(max(hf_ids(hf, t, True), default=0) for t in texts) < tok.vocab_size
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )


def test_special_ids_stop_ids_and_save(llama3_dir, gemma_dir, tmp_path):
    llama = open_tokenizer(llama3_dir)
    eot, end = llama.token_to_id("<|eot_id|>"), llama.token_to_id("<|end_of_text|>")
    assert llama.eos_id == end and llama.pad_id is None
    # The eos first, then the turn ends generation_config.json adds, without repeats.
    assert llama.stop_ids == (end, eot)
    gemma = open_tokenizer(gemma_dir)
    assert gemma.stop_ids == (gemma.eos_id,) and gemma.pad_id == gemma.token_to_id("<pad>")
    # The ids of a text only grow past the model's pieces through added tokens.
    assert gemma.encode("<start_of_turn>")[0] == gemma.vocab_size - 3

    llama.save(tmp_path / "copy")
    again = open_tokenizer(tmp_path / "copy")
    assert again.sha256 == llama.sha256 != gemma.sha256
    assert again.stop_ids == llama.stop_ids and again.chat_template == llama.chat_template
    # The hash is of the contents: a copied directory hashes the same.
    shutil.copytree(llama3_dir, tmp_path / "cp")
    assert open_tokenizer(tmp_path / "cp").sha256 == llama.sha256
    # A tokenizer.json given as a file reads the configuration beside it.
    assert open_tokenizer(llama3_dir / "tokenizer.json").stop_ids == llama.stop_ids


def test_template_in_tokenizer_config(llama3_dir, tmp_path):
    # The layout before transformers 5: the template is a field of tokenizer_config.json.
    d = shutil.copytree(llama3_dir, tmp_path / "old")
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = open_tokenizer(d)
    assert tok.chat_template == hf.chat_template == template
    msgs = [{"role": "user", "content": "hello <|eot_id|> world"}]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs)["input_ids"]

    # Named templates: "default" is the chat template, others are chosen by name.
    named = [{"name": "default", "template": template}, {"name": "plain", "template": "{{ 1 }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    tok = open_tokenizer(d)
    assert tok.chat_template == template
    assert tok.apply_chat_template(msgs, tokenize=False, chat_template="plain") == "1"
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named[1:]}))
    with pytest.raises(DataError, match="named templates"):
        open_tokenizer(d).apply_chat_template(msgs)


def test_special_tokens_map_layout(llama3_dir, tmp_path):
    # The oldest layout: no added_tokens_decoder, special tokens in special_tokens_map.json.
    d = shutil.copytree(llama3_dir, tmp_path / "legacy")
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|begin_of_text|>"}))
    (d / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "eos_token": {"content": "<|eot_id|>", "lstrip": False},
                "pad_token": "<|pad|>",
            }
        )
    )
    hf = transformers.AutoTokenizer.from_pretrained(d)
    tok = open_tokenizer(d)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (
        hf.eos_token_id,
        hf.pad_token_id,
        hf.bos_token_id,
    )
    # A special token the vocabulary lacks is added, as transformers adds it.
    assert tok.vocab_size == len(hf) and tok.encode("a<|pad|>") == hf_ids(hf, "a<|pad|>")


def test_config_flags_yield_to_tokenizer_json(llama3_dir, tmp_path):
    # With a tokenizer.json, transformers 5 ignores the config's add_bos_token/add_eos_token:
    # the file's post-processor alone decides what add_special_tokens adds.
    for flags in ({"add_bos_token": False, "add_eos_token": True}, {"add_bos_token": True}):
        d = shutil.copytree(llama3_dir, tmp_path / str(len(flags)))
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        hf = transformers.AutoTokenizer.from_pretrained(d)
        tok = open_tokenizer(d)
        for text in TEXTS[:4]:
            assert tok.encode(text, add_special_tokens=True) == hf_ids(hf, text, True), flags


def train_sentencepiece(**options) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(600, seed=1) + TEXTS[:6]),
        model_writer=out,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return out.getvalue()


@pytest.mark.parametrize("add_bos", [None, True])
def test_sentencepiece_only_directory(tmp_path, add_bos):
    # Llama 2's layout: unk 0, bos 1, eos 2; added tokens only in tokenizer_config.json.
    proto = train_sentencepiece(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    n = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    added = {
        str(n): {"content": "<|im_end|>", "special": True, "normalized": False},
        str(n + 1): {"content": "[TOOL]", "special": False, "normalized": False},
        str(n + 2): {"content": "<mask>", "special": True, "lstrip": True, "rstrip": True},
    }
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    )
    config = {"added_tokens_decoder": added, "chat_template": template}
    if add_bos is not None:
        config["add_bos_token"] = add_bos
    (tmp_path / "tokenizer.model").write_bytes(proto)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = open_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(hf) == n + 3
    texts = TEXTS + ["a<s>b</s> c", "hi <|im_end|> there[TOOL]x", "<|im_end|>", "a \t<mask>\n b"]
    for text in texts:
        for add in (False, True):
            assert tok.encode(text, add) == hf_ids(hf, text, add), (text, add)
        ids = hf_ids(hf, text, True)
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), (text, skip)
    assert tok.encode_batch(texts) == [hf_ids(hf, t) for t in texts]
    msgs = [
        {"role": "user", "content": "hello <|im_end|>"},
        {"role": "assistant", "content": "a b"},
    ]
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs)["input_ids"]
    ids, mask = tok.apply_chat_template(msgs, return_assistant_tokens_mask=True)
    want = hf.apply_chat_template(msgs, return_assistant_tokens_mask=True)
    assert (ids, mask) == (want["input_ids"], want["assistant_masks"]) and sum(mask) > 1


@pytest.fixture(scope="module")
def llmjax_tok():
    lines = [f"User:\nline {i} has words and {i * 7} numbers\nAssistant:\nok" for i in range(1500)]
    return Tokenizer.train(iter(lines), TokenizerConfig(400))


def test_open_llmjax_tokenizer(llmjax_tok, tmp_path):
    llmjax_tok.save(tmp_path / "tok.model")
    assert isinstance(open_tokenizer(tmp_path / "tok.model"), Tokenizer)
    # save() into a directory writes tokenizer.model, what an exported model directory holds.
    llmjax_tok.save(tmp_path)
    opened = open_tokenizer(tmp_path)
    assert isinstance(opened, Tokenizer) and opened.sha256 == llmjax_tok.sha256
    # Plain text stays plain: a corpus quoting "</s>" never yields the eos id.
    assert llmjax_tok.eos_id not in llmjax_tok.encode("a </s> b <s>")
    assert llmjax_tok.encode("ab", add_special_tokens=True)[0] == llmjax_tok.bos_id
    ids = [llmjax_tok.bos_id, *llmjax_tok.encode("line 1"), llmjax_tok.eos_id]
    assert llmjax_tok.decode(ids) == "line 1"
    assert llmjax_tok.decode(ids, skip_special_tokens=False) == "<s>line 1</s>"
    assert llmjax_tok.stop_ids == (llmjax_tok.eos_id,) and llmjax_tok.pad_id == 0


def test_bad_tokenizer_paths(tmp_path, llama3_dir):
    with pytest.raises(DataError, match="no such file or directory"):
        open_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"holds config\.json; it needs tokenizer\.json"):
        open_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"is a \.txt file"):
        open_tokenizer(tmp_path / "vocab.txt")
    broken = shutil.copytree(llama3_dir, tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(DataError, match="tokenizer.json cannot be read"):
        open_tokenizer(broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        open_tokenizer(broken)
    shutil.copy(llama3_dir / "tokenizer.json", broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        open_tokenizer(broken)
    (broken / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="has no chat template"):
        (broken / "chat_template.jinja").unlink()
        open_tokenizer(broken).apply_chat_template([{"role": "user", "content": "x"}])
