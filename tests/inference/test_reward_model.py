"""Reward models at inference: ``RewardModel.score``, best-of-N rated by one, ``llmjax generate
--best-of`` with and without ``--reward-model``, and loading a transformers reward model."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.errors import InputError
from llmjax.inference import RewardModel, best_of_n, generate, load_reward_model
from llmjax.inference.reward import pad_id_for_export
from llmjax.interop.hf_score import to_hf_scorer
from llmjax.scalar_head import init_score_head, sequence_scores

PROMPT = [1, 17, 33, 250, 9]
TOL = 1e-4


@pytest.fixture(scope="module")
def reward(llama):
    """A random head on the tiny llama: a real reward model, if not a useful one."""
    model, params = llama
    return RewardModel(model, params, init_score_head(model, jax.random.key(7)))


# One unpadded row per call: compiled per length, as eager dispatch would also do, only faster.
_one_row = jax.jit(sequence_scores, static_argnums=0)


def alone(rm, sequences):
    """Each sequence scored by ``sequence_scores`` in a batch of its own, without padding."""
    rows = [np.asarray([s], np.int32) for s in sequences]
    return np.asarray([_one_row(rm.model, rm.params, rm.head, row)[0] for row in rows])


def test_scores_do_not_depend_on_padding_or_batch(reward):
    rng = np.random.default_rng(0)
    lengths = [3, 20, 1, 17, 16]  # two length buckets (16, 32)
    seqs = [rng.integers(0, 512, n).tolist() for n in lengths]
    want = alone(reward, seqs)
    for batch_size in (2, 32):  # filler rows in both
        got = reward.score(seqs, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (len(seqs),)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(reward.score(seqs[::-1]), want[::-1], atol=TOL, rtol=0)
    assert reward.score([]).shape == (0,)


def test_score_refuses_ids_outside_the_vocabulary(reward):
    with pytest.raises(InputError, match=r"sequences\[1\]\[2\]=512: is outside the vocabulary"):
        reward.score([[1, 2], [3, 4, 512]])
    with pytest.raises(InputError, match=r"sequences\[0\]=\[\]: is empty"):
        reward.score([[]])
    with pytest.raises(InputError, match="batch_size=0"):
        reward.score([[1]], batch_size=0)


def test_best_of_n_takes_the_reward_models_argmax_with_stop_tokens(llama, reward):
    model, params = llama
    kw = dict(max_new_tokens=6, top_k=4, seed=3)
    free = generate(model, params, [PROMPT] * 6, temperature=1.0, **kw).tokens
    # Tokens the samples draw anyway, made stop ids: the same draws, cut where they appear.
    several = sorted({free[0][2], free[1][3], free[2][1]})
    assert len(several) > 1  # several stop ids: which one ended a sample is not in the result
    for stops in ([free[0][2]], several):
        out = best_of_n(model, params, PROMPT, 6, reward_model=reward, stop_tokens=stops, **kw)
        samples = out.samples
        assert any(samples.stopped) and not all(samples.stopped)
        ends = [
            [free[b][n]] if s else []
            for b, (n, s) in enumerate(zip(samples.lengths, samples.stopped, strict=True))
        ]
        assert all(e[0] in stops for e in ends if e)
        want = alone(reward, [PROMPT + t + e for t, e in zip(samples.tokens, ends, strict=True)])
        np.testing.assert_allclose(out.scores, want, atol=TOL, rtol=0)
        assert out.tokens == samples.tokens[int(np.argmax(want))]
        assert out.score == max(out.scores)
    with pytest.raises(InputError, match="score or reward_model, not both"):
        best_of_n(model, params, PROMPT, 2, score=lambda t, lp: 0.0, reward_model=reward, **kw)


def test_a_transformers_reward_model_loads_with_its_scores(tmp_path):
    from tests.hf_util import build_hf, torch

    hf = build_hf(
        "llama",
        cls="LlamaForSequenceClassification",
        num_labels=1,
        pad_token_id=0,
        num_hidden_layers=2,
    )
    hf.save_pretrained(tmp_path)
    rm = llmjax.load_reward_model(tmp_path)
    assert rm.tokenizer is None  # the directory has none
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 97, n).tolist() for n in (4, 11, 1, 18)]
    with torch.no_grad():
        want = [hf(torch.as_tensor([s])).logits[0, 0].item() for s in seqs]
    assert np.max(np.abs(rm.score(seqs, batch_size=2) - want)) <= TOL


def test_a_language_model_directory_is_not_a_reward_model(llama, tmp_path):
    llmjax.to_hf(*llama, tmp_path)
    with pytest.raises(InputError, match=r"LlamaForCausalLM, a language model.*llmjax reward"):
        load_reward_model(tmp_path)
    with pytest.raises(InputError, match="no such file or directory; give a run trained with"):
        load_reward_model(tmp_path / "nowhere")


# --- the command line -------------------------------------------------------------------------


def tokenizer(vocab_size=300):
    from llmjax.data import Tokenizer, TokenizerConfig

    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]
    return Tokenizer.train(lines, TokenizerConfig(vocab_size=vocab_size))


@pytest.fixture(scope="module")
def dirs(llama, reward, tmp_path_factory):
    """A generating model and a reward model on it, as Hugging Face directories with one
    tokenizer, and the reward model again with another tokenizer."""
    model, params = llama
    root = tmp_path_factory.mktemp("cli")
    tok = tokenizer()
    llmjax.to_hf(model, params, root / "gen")
    to_hf_scorer(model, params, reward.head, root / "rm", pad_token_id=tok.pad_id)
    for d in ("gen", "rm"):
        tok.save(root / d / "tokenizer.model")
    shutil.copytree(root / "rm", root / "rm-other")
    tokenizer(320).save(root / "rm-other" / "tokenizer.model")
    (root / "elsewhere").mkdir()
    return root, tok


def expected(gen_dir, prompt: str, n: int, reward_model=None):
    """What ``llmjax generate --hf GEN_DIR --prompt PROMPT --best-of N`` should print, by the
    Python API: its sampling settings (the CLI's defaults), its stop and forbidden ids."""
    from llmjax.data.hf_tokenizer import open_tokenizer

    model, params = llmjax.from_hf(gen_dir)
    tok = open_tokenizer(gen_dir)
    unused = list(range(tok.vocab_size, model.config.vocab_size))
    return tok, best_of_n(
        model, params, tok.encode(prompt, add_special_tokens=True), n, reward_model=reward_model,
        max_new_tokens=6, temperature=0.8, stop_tokens=list(tok.stop_ids), forbidden_tokens=unused,
        seed=0,
    )  # fmt: skip


def run_cli(root, monkeypatch, capsys, *args, gen="../gen", prompt="the fox"):
    monkeypatch.chdir(root / "elsewhere")  # relative paths, as typed from another directory
    argv = ["generate", "--hf", gen, "--prompt", prompt, "--max-new-tokens", "6", *args]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_best_of_prints_the_reward_models_choice(dirs, monkeypatch, capsys):
    root, _ = dirs
    tok, want = expected(root / "gen", "the fox", 4, load_reward_model(root / "rm"))
    code, out, err = run_cli(root, monkeypatch, capsys, "--best-of", "4", "--reward-model", "../rm")
    assert code == 0, err
    text, line = out.rstrip("\n").rsplit("\n", 1)
    assert text == "the fox" + tok.decode(want.tokens)
    m = re.fullmatch(r"\[best of 4 by the reward model \.\./rm: (-?[\d.]+)\]", line)
    assert m and float(m.group(1)) == pytest.approx(want.score, abs=1e-3)


def test_cli_best_of_without_a_reward_model_rates_by_mean_logprob(dirs, monkeypatch, capsys):
    root, _ = dirs
    tok, want = expected(root / "gen", "the fox", 4)  # 4 as above: the same compiled sampler
    code, out, err = run_cli(root, monkeypatch, capsys, "--best-of", "4")
    assert code == 0, err
    text, line = out.rstrip("\n").rsplit("\n", 1)
    assert text == "the fox" + tok.decode(want.tokens)
    assert line == f"[best of 4 by mean log-probability: {want.score:.4f}]"


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--best-of", "2", "--reward-model", "../rm-other"],
            r"--reward-model \.\./rm-other: its tokenizer \(sha256 \w+\) is not the one of "
            r"--hf \.\./gen \(sha256 \w+\); .*llmjax reward --base \.\./gen",
        ),
        (["--reward-model", "../rm"], r"--reward-model \.\./rm: .*add --best-of N"),
        (["--best-of", "2", "--temperature", "0"], r"--temperature 0\.0: greedy .*temperature > 0"),
        (["--best-of", "2", "--draft", "../gen"], r"--best-of 2: .*drop --draft or --best-of"),
        (["--best-of", "0"], r"--best-of 0: must be an int >= 1"),
        (
            ["--best-of", "2", "--reward-model", "../nowhere"],
            r"--reward-model \.\./nowhere: no such",
        ),
    ],
    ids=["other-tokenizer", "no-best-of", "greedy", "draft", "zero", "missing"],
)
def test_cli_refuses_in_one_line(dirs, monkeypatch, capsys, args, says):
    code, out, err = run_cli(dirs[0], monkeypatch, capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"llmjax generate: error: " + says, lines[0]), err


# --- a reward model trained by `llmjax reward` ------------------------------------------------


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """A tiny Hugging Face chat base, a 3-step `llmjax reward` run on it and its export, all made
    through the command line from a neighbouring directory."""
    from tests.recipes.hf_base import NUMBERS, make_base

    root = tmp_path_factory.mktemp("reward")
    make_base(root / "base")
    pairs = [
        {
            "prompt": f"what is {NUMBERS[a]} plus {NUMBERS[b]}",
            "chosen": f" {NUMBERS[a + b]}",
            "rejected": f" {NUMBERS[(a + b + 1) % 10]}",
        }
        for a in range(5)
        for b in range(5)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "elsewhere")
        train = ["--data", "../pairs.jsonl", "--out", "../rm", "--steps", "3", "--seq-len", "32"]
        assert main(["reward", "--base", "../base", *train, "--batch-size", "2"]) == 0
        assert main(["export", "--ckpt", "../rm", "--out", "../rm-hf"]) == 0
    return root


def test_a_trained_reward_run_exports_loads_and_rates_samples(reward_run, monkeypatch, capsys):
    from llmjax.data.hf_tokenizer import open_tokenizer
    from tests.hf_util import torch, transformers

    root = reward_run
    rm = load_reward_model(root / "rm")
    tok = open_tokenizer(root / "base")
    assert rm.head["score"].shape == (rm.model.config.d_model,)
    assert rm.tokenizer.sha256 == tok.sha256
    # Scored as trained: prompt + completion, ending with eos.
    texts = ["what is two plus three five", "what is one plus one two", "what is four plus"]
    seqs = [tok.encode(t, add_special_tokens=True) + [tok.eos_id] for t in texts]
    scores = rm.score(seqs)
    assert len(set(scores.tolist())) == len(seqs)

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(root / "rm-hf").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    pad = hf.config.pad_token_id
    assert pad not in tok.stop_ids  # else transformers would score the token before eos
    T = max(map(len, seqs))
    right = [s + [pad] * (T - len(s)) for s in seqs]
    left = [[pad] * (T - len(s)) + s for s in seqs]
    for batch in (right, left):
        ids = torch.as_tensor(batch)
        with torch.no_grad():
            got = hf(ids, attention_mask=(ids != pad).long()).logits[:, 0].numpy()
        assert np.max(np.abs(got - scores)) <= TOL
    exported = load_reward_model(root / "rm-hf")
    assert exported.tokenizer.sha256 == tok.sha256
    assert np.max(np.abs(exported.score(seqs) - scores)) <= TOL

    prompt = "what is two plus three"
    _, want = expected(root / "base", prompt, 3, rm)
    flags = ["--best-of", "3", "--reward-model", "../rm"]
    code, out, err = run_cli(root, monkeypatch, capsys, *flags, gen="../base", prompt=prompt)
    assert code == 0, err
    text, line = out.rstrip("\n").rsplit("\n", 1)
    assert text == prompt + tok.decode(want.tokens)
    assert line == f"[best of 3 by the reward model ../rm: {want.score:.4f}]"


def test_a_run_without_a_head_is_not_a_reward_model(tmp_path, monkeypatch):
    import types

    monkeypatch.setattr("llmjax.runs.load_run", lambda path: types.SimpleNamespace(head=None))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()  # a run's place; the stub stands for what it holds
    with pytest.raises(InputError, match=r"^run is a run without a reward head.*reward --base run"):
        load_reward_model("run")


def test_an_exported_reward_model_pads_with_an_id_that_ends_no_sequence():
    import types

    def tok(pad, vocab=300, unk=None):
        return types.SimpleNamespace(
            pad_id=pad, eos_id=1, unk_id=unk, vocab_size=vocab, stop_ids=(1, 5)
        )

    assert pad_id_for_export(tok(0), 320) == 0  # a pad of its own
    assert pad_id_for_export(tok(1), 320) == 300  # eos as pad: the first id beyond the tokenizer
    assert pad_id_for_export(tok(5, 320, unk=2), 320) == 2  # no spare id: unk
    assert pad_id_for_export(tok(None, 320), 320) == 1  # nothing else: eos, with a note
