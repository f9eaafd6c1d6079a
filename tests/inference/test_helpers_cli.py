"""Best-of-N, self-consistency, CoT-decoding, and the ``generate`` command line."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.inference import best_of_n, cot_decode, generate, self_consistency
from llmjax.inference.cli import main

PROMPT = [1, 17, 33, 250, 9]


def test_best_of_n_keeps_the_highest_score(llama):
    model, params = llama
    score = lambda toks, lps: -float(np.sum(toks))  # any function of a sample
    out = best_of_n(model, params, PROMPT, 6, score=score, max_new_tokens=5, seed=2)
    sums = [sum(t) for t in out.samples.tokens]
    assert len(set(sums)) > 1  # distinct samples, so the choice matters
    assert out.tokens == out.samples.tokens[int(np.argmin(sums))]
    assert out.score == -min(sums)
    default = best_of_n(model, params, PROMPT, 6, max_new_tokens=5, seed=2)
    means = [np.mean(lp) for lp in default.samples.logprobs]
    assert default.tokens == default.samples.tokens[int(np.argmax(means))]


def test_self_consistency_is_a_majority_vote(llama):
    model, params = llama
    extract = lambda toks: None if toks[0] % 5 == 0 else toks[0] % 2  # parity of the first token
    vote = self_consistency(model, params, PROMPT, 6, extract, max_new_tokens=3, seed=4)
    answers = [extract(t) for t in vote.samples.tokens]
    expected = collections.Counter(a for a in answers if a is not None)
    assert vote.votes == expected
    assert vote.votes[vote.answer] == max(expected.values())


def test_cot_decode_branches_on_top_k_and_picks_the_most_confident(llama):
    model, params = llama
    res = cot_decode(model, params, PROMPT, k=3, max_new_tokens=6, answer_span=lambda t: (2, 6))
    first = model.apply(params, jnp.asarray([PROMPT]))[0, -1]
    assert [b.tokens[0] for b in res.branches] == list(np.argsort(-np.asarray(first))[:3])
    for b in res.branches:
        cont = generate(model, params, [PROMPT + b.tokens[:1]], max_new_tokens=5).tokens[0]
        assert b.tokens[1:] == cont
        probs = np.asarray(jax.nn.softmax(model.apply(params, jnp.asarray([PROMPT + b.tokens]))[0]))
        p = np.sort(probs[len(PROMPT) + 1 : len(PROMPT) + 5], axis=-1)  # answer tokens 2..5
        np.testing.assert_allclose(b.confidence, np.mean(p[:, -1] - p[:, -2]), atol=1e-5)
    assert res.best.confidence == max(b.confidence for b in res.branches)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = llmjax.build("llama3-tiny", init_std=0.3)
    params = model.init(jax.random.key(0))
    path = tmp_path_factory.mktemp("hf")
    llmjax.to_hf(model, params, path)
    return model, params, str(path)


def test_cli_streams_the_same_tokens_as_generate(hf_dir, capsys):
    model, params, path = hf_dir
    ref = generate(model, params, [[1, 2, 3]], max_new_tokens=6).tokens[0]
    argv = ["--hf", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, ref))
    assert main([*argv, "--draft", path, "--num-draft", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == ",".join(map(str, ref)) and "acceptance rate 1.00" in out[1]
    assert main([*argv, "--quantize", "int8"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 6


def test_cli_help_shows_every_default(capsys):
    from llmjax.inference.cli import parser

    for action in parser()._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
            if action.default is not None:
                assert "%(default)s" in action.help, action.dest
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 100)" in text and "(default: 0.8)" in text and "(default: off)" in text


def test_cli_needs_ids_without_a_tokenizer(hf_dir, capsys):
    from llmjax.cli import main as llmjax_main

    _, _, path = hf_dir
    assert llmjax_main(["generate", "--hf", path, "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax generate: error: --prompt") and "--prompt-ids" in err


def test_cli_streams_text_with_the_directory_tokenizer(hf_dir, tmp_path, capsys):
    import shutil

    from llmjax.data import Tokenizer, TokenizerConfig

    model, params, path = hf_dir
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(200)]
    tok = Tokenizer.train(lines, TokenizerConfig(vocab_size=300))
    local = tmp_path / "hf"
    shutil.copytree(path, local)
    tok.save(local / "tokenizer.model")
    ids = [tok.bos_id] + tok.encode("the fox")
    unused = range(tok.vocab_size, model.config.vocab_size)  # the model's padded vocabulary
    ref = generate(
        model, params, [ids], max_new_tokens=8, stop_tokens=[tok.eos_id], forbidden_tokens=unused
    ).tokens[0]
    assert ref
    argv = [
        "--hf",
        str(local),
        "--prompt",
        "the fox",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == "the fox" + tok.decode(ref) + "\n"


@pytest.mark.slow
def test_cli_on_a_trained_checkpoint(tmp_path, capsys):
    from llmjax.cli import main as llmjax_main
    from llmjax.runs import load_run
    from tests.train.helpers import cli_args

    out = tmp_path / "run"
    assert llmjax_main(cli_args(out, steps=4)) == 0
    capsys.readouterr()
    run = load_run(out)
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode("The ")
    unused = range(tok.vocab_size, run.model.config.vocab_size)
    ref = generate(
        run.model, run.params, [ids], max_new_tokens=10, stop_tokens=[tok.eos_id],
        forbidden_tokens=unused,
    ).tokens[0]  # fmt: skip
    argv = ["--ckpt", str(out), "--prompt", "The ", "--max-new-tokens", "10", "--temperature", "0"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "The " + tok.decode(ref) + "\n"
