"""``llmjax sft`` end to end: an HF base with tokenizer.json and a chat template, LoRA and QLoRA,
PEFT export checked in ``peft``, bit-exact resume, full fine-tuning from a llmjax run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.runs import load_run
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_records


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("sft") / "base")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    bad = ['{"prompt": "what is one plus one", "completion": ""}', '{"prompt": "x"}']
    return write_records(tmp_path_factory.mktemp("sft-data") / "sums.jsonl", bad)


def sft(base, data, out, *extra) -> int:
    args = ["sft", "--base", str(base), "--data", str(data), "--out", str(out)]
    args += ["--batch-size", "4", "--seq-len", "32", "--set", "loop.log_every=1"]
    args += ["--set", "exact_match_prompts=4", "--set", "max_new_tokens=4"]
    return main([*args, *extra])


# A schedule that does not depend on loop.steps, so 3 steps then 3 more is a 6-step run.
RESUMABLE = ["--lr", "1e-2", "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=2"]
RESUMABLE += ["--set", "loop.save_every=3"]


@pytest.fixture(scope="module")
def lora_run(base, records, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    extra = ["--lora-rank", "4", "--steps", "6", *RESUMABLE]
    assert sft(base, records, out, *extra, "--set", "loop.eval_every=3") == 0
    return out


def _logits_torch(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


def test_lora_run_logs_trl_metrics_and_keeps_only_adapters(lora_run, base):
    recs = read_metrics(lora_run)
    start = recs[0]
    assert start["step"] == 0 and 0 < start["fraction_trainable"] < 0.2
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all({"mean_token_accuracy", "num_tokens", "grad_norm"} <= r.keys() for r in steps)
    assert steps[-1]["num_tokens"] > steps[0]["num_tokens"]  # cumulative, as TRL counts
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and "eval_exact_match" in evals[-1]
    # The checkpoint holds the adapters and their optimizer state, nothing of the base.
    manifest = json.loads((lora_run / "checkpoints" / "6" / "manifest.json").read_text())
    params = [k for k in manifest["arrays"] if k.startswith("params/")]
    assert params and all(k.endswith(("/a", "/b")) for k in params)
    assert not [k for k in manifest["arrays"] if "embed" in k or "norm" in k]
    run = load_run(lora_run)
    n_adapters = sum(x.size for x in jax.tree.leaves(run.adapters))
    assert len(params) == len(jax.tree.leaves(run.adapters))
    assert n_adapters == start["trainable_params"]


def test_peft_export_loads_in_peft_with_equal_logits(lora_run, base, tmp_path):
    import peft
    import torch
    import transformers

    model, params = llmjax.load(lora_run)
    tok = llmjax.load_tokenizer(lora_run)
    ids = tok.apply_chat_template([{"role": "user", "content": "what is two plus three"}])
    ours = np.asarray(model.apply(params, jnp.asarray([ids])))
    assert main(["export", "--ckpt", str(lora_run), "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = _logits_torch(peft.PeftModel.from_pretrained(hf, tmp_path / "peft"), ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # The adapters moved the model: the comparison is not of the base with itself.
    plain = _logits_torch(transformers.AutoModelForCausalLM.from_pretrained(base), ids)
    assert np.abs(plain - theirs).max() > 1e-3
    merged = tmp_path / "merged"
    assert main(["export", "--ckpt", str(lora_run), "--out", str(merged), "--merge"]) == 0
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    np.testing.assert_allclose(ours, _logits_torch(hf_merged, ids), atol=1e-4, rtol=0)
    # The exported tokenizer encodes as the run's.
    again = transformers.AutoTokenizer.from_pretrained(merged)
    assert (
        again.apply_chat_template(
            [{"role": "user", "content": "what is two plus three"}], tokenize=True
        )["input_ids"]
        == ids
        or again.apply_chat_template(
            [{"role": "user", "content": "what is two plus three"}], tokenize=True
        )
        == ids
    )


def test_lora_resume_is_bit_exact(lora_run, base, records, tmp_path):
    out = tmp_path / "resumed"
    extra = ["--lora-rank", "4", *RESUMABLE]
    # Without evaluations: they change no training state, and cost a compile each here.
    assert sft(base, records, out, *extra, "--steps", "3", "--set", "loop.eval_every=0") == 0
    assert sft(base, records, out, *extra, "--steps", "6", "--set", "loop.eval_every=0") == 0
    whole = {r["step"]: r["loss"] for r in read_metrics(lora_run) if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert resumed == whole
    a, b = load_run(lora_run).adapters, load_run(out).adapters
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_refuses_other_lora_settings(lora_run, base, records, capsys):
    rc = sft(base, records, lora_run, "--lora-rank", "8", "--steps", "8")
    err = [ln for ln in capsys.readouterr().err.splitlines() if "records skipped" not in ln]
    assert rc == 2 and len(err) == 1, err
    assert "another set of parameters" in err[0] and "--out" in err[0]


@pytest.mark.slow  # QLoRA's pieces are tested in tests/test_lora.py; this is the whole command
def test_qlora_nf4_trains_adapters_over_a_quantized_base(base, records, tmp_path):
    out = tmp_path / "qlora"
    extra = ["--lora-rank", "4", "--quantize-base", "nf4", "--steps", "4", "--lr", "1e-2"]
    extra += ["--lora-dropout", "0.1"]
    assert sft(base, records, out, *extra, "--set", "loop.eval_every=0") == 0
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))
    run = load_run(out)
    # The loaded model is the one trained: adapters over the nf4-rounded base, not the original.
    from llmjax.inference.quantize import dequantize, quantize

    original = llmjax.from_hf(base)[1]
    rounded = dequantize(quantize(run.model, original, "nf4", keep="lm_head"))
    for name in ("embed", "lm_head"):  # the output head stays float, as transformers keeps it
        np.testing.assert_array_equal(run.base_params[name], original[name])
    from llmjax.models.scan import unstack_layers

    wq = lambda p: unstack_layers(run.model.config, p)["layers"][0]["attn"]["wq"]  # noqa: E731
    np.testing.assert_array_equal(wq(run.base_params), wq(rounded))
    assert not np.array_equal(wq(run.base_params), wq(original))


def test_full_finetuning_from_a_llmjax_run(trained_run, tmp_path):
    """A llmjax run as the base: its SentencePiece tokenizer, built-in chat template, every
    parameter trained (or a subset with ``trainable``)."""
    data = write_records(tmp_path / "sums.jsonl")
    out = tmp_path / "full"
    pattern = r"layers\.\d+\.mlp\..*"  # every layer's MLP: one stacked block of the scan
    extra = ["--steps", "3", "--set", "loop.eval_every=0", "--set", f"trainable={pattern}"]
    assert sft(trained_run, data, out, *extra) == 0
    before = load_run(trained_run)
    after = load_run(out)
    flat_b = dict(jax.tree_util.tree_flatten_with_path(before.params)[0])
    flat_a = dict(jax.tree_util.tree_flatten_with_path(after.params)[0])
    assert flat_a.keys() == flat_b.keys()
    changed = {jax.tree_util.keystr(k) for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])}
    assert changed and all(k.startswith("['blocks'][0]['mlp']") for k in changed)
    manifest = json.loads((out / "checkpoints" / "3" / "manifest.json").read_text())
    assert all(
        k.startswith("params/blocks/0/mlp/") for k in manifest["arrays"] if k.startswith("params/")
    )


def test_a_pattern_choosing_some_layers_trains_an_unrolled_base(trained_run, tmp_path, capsys):
    """One layer of a scanned stack cannot train alone: refused in one line that names the fix,
    which then trains layer 1 only."""
    data = write_records(tmp_path / "sums.jsonl")
    extra = ["--steps", "2", "--set", "loop.eval_every=0", "--set", r"trainable=layers\.1\..*"]
    capsys.readouterr()
    assert sft(trained_run, data, tmp_path / "refused", *extra) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "records skipped" not in ln]
    assert len(err) == 1 and "--set scan_layers=false" in err[0], err
    out = tmp_path / "unrolled"
    assert sft(trained_run, data, out, *extra, "--set", "scan_layers=false") == 0
    manifest = json.loads((out / "checkpoints" / "2" / "manifest.json").read_text())
    trained = {k for k in manifest["arrays"] if k.startswith("params/")}
    assert trained and all(k.startswith("params/layers/1/") for k in trained)
    after = load_run(out)
    assert not after.model.config.scan_layers and "blocks" not in after.params


def test_bad_base_and_small_vocabulary_are_one_line_errors(base, records, tmp_path, capsys):
    small = make_base(tmp_path / "small", vocab_size=260)  # the tokenizer has 300 pieces
    capsys.readouterr()
    rc = sft(tmp_path / "nowhere", records, tmp_path / "a", "--steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such file or directory" in err[0], err
    rc = sft(small, records, tmp_path / "b", "--steps", "1")
    err = [ln for ln in capsys.readouterr().err.splitlines() if "records skipped" not in ln]
    assert rc == 2 and len(err) == 1 and "260" in err[-1], err


def test_generate_chat_wraps_the_prompt_in_the_runs_template(lora_run, capsys):
    message = "what is two plus three"
    argv = ["generate", "--ckpt", str(lora_run), "--chat", "--prompt", message]
    assert main([*argv, "--max-new-tokens", "6", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.strip("\n")
    model, params = llmjax.load(lora_run)
    tok = llmjax.load_tokenizer(lora_run)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True
    )
    assert ids[-3:] != tok.encode(message)[-3:]  # the template added the assistant header
    want = llmjax.generate(
        model, params, [ids], max_new_tokens=6, temperature=0.0, stop_tokens=tok.stop_ids
    ).tokens[0]
    assert printed == tok.decode(want)


def test_eval_scores_a_finetuned_run_on_its_held_out_records(lora_run, capsys):
    assert main(["eval", "--ckpt", str(lora_run), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    last = [r for r in read_metrics(lora_run) if "eval_loss" in r][-1]
    assert f"loss {last['eval_loss']:.4f}" in out
    assert f"exact match {last['eval_exact_match']:.3f} on 3 prompts" in out  # 3 held out
