"""``llmjax dpo`` and ``llmjax reward`` end to end on a tiny Hugging Face base: the reference is
the base and never moves, cached reference log-probs equal online ones, LoRA's reference is the
base with the adapters off, reference-free losses load no reference, resume is bit-exact, and a
reward model's logged accuracy is what its saved weights score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.data.preference import PreferenceDataConfig, build_preference_data
from llmjax.recipes.pairs import REFERENCE_FILE, pair_logps
from llmjax.runs import load_run
from llmjax.scalar_head import sequence_scores
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_pairs

B, T = 4, 32
# A schedule that does not depend on loop.steps, so 2 steps then 2 more is a 4-step run.
STEADY = ["--lr", "1e-2", "--set", "optim.schedule=constant", "--set", "optim.warmup_steps=1"]
STEADY += ["--set", "loop.save_every=2", "--set", "loop.eval_every=2", "--set", "loop.log_every=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("pref") / "base")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    extra = ['{"prompt": "what is one plus one", "chosen": " two", "rejected": " two"}']
    return write_pairs(tmp_path_factory.mktemp("pref-data") / "pairs.jsonl", extra)


def run(command, base, data, out, *extra) -> int:
    args = [command, "--base", str(base), "--data", str(data), "--out", str(out)]
    return main([*args, "--batch-size", str(B), "--seq-len", str(T), *STEADY, *extra])


def steps(out) -> dict[int, dict]:
    """Each step's training record (the last one per step: a resumed run rewrites none)."""
    return {r["step"]: r for r in read_metrics(out) if "loss" in r and "eval_loss" not in r}


def evals(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "eval_loss" in r}


@pytest.fixture(scope="module")
def cached(base, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "cached"
    assert run("dpo", base, pairs, out, "--steps", "4") == 0
    return out


@pytest.fixture(scope="module")
def online(base, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "online"
    assert run("dpo", base, pairs, out, "--steps", "4", "--reference", "online") == 0
    return out


def manifest(out, step) -> dict:
    return json.loads((out / "checkpoints" / str(step) / "manifest.json").read_text())


def heldout_batch(base, pairs):
    tok = llmjax.load_tokenizer(base)
    data = build_preference_data(PreferenceDataConfig(str(pairs), T, 0, B), tok, 320)
    batch = next(data.heldout.batches(len(data.heldout)))
    return {k: v for k, v in batch.items() if k != "pair_index"}


def test_policy_starts_at_the_reference_and_cached_equals_online(cached, online):
    a, b = steps(cached), steps(online)
    # Step 1's policy is the base: every DPO loss is log 2, its rewards 0.
    assert a[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert a[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for step in (1, 2, 3, 4):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-4, abs=1e-5), (step, key)
    ea, eb = evals(cached)[4], evals(online)[4]
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        assert ea[key] == pytest.approx(eb[key], rel=1e-4, abs=1e-5)
    assert "perplexity" not in ea
    assert (cached / REFERENCE_FILE).is_file() and not (online / REFERENCE_FILE).exists()


def test_rewards_are_measured_against_the_untouched_base(online, base, pairs):
    """The logged held-out rewards equal beta * (policy - base) log-probs recomputed from the
    saved policy and the base's files: the reference never trained."""
    batch = heldout_batch(base, pairs)
    policy_model, policy = llmjax.load(online)
    base_model, base_params = llmjax.from_hf(base, param_dtype="float32")
    pi, _ = pair_logps(policy_model, policy, batch)
    ref, _ = pair_logps(base_model, base_params, batch)
    rewards = 0.1 * (np.asarray(pi) - np.asarray(ref))
    logged = evals(online)[4]
    assert np.abs(rewards).max() > 1e-3  # the policy moved
    assert logged["eval_rewards/chosen"] == pytest.approx(rewards[:, 0].mean(), abs=1e-5)
    assert logged["eval_rewards/rejected"] == pytest.approx(rewards[:, 1].mean(), abs=1e-5)
    assert set(load_run(online).meta["identity"]) >= {"base", "preference"}


def test_eval_scores_a_dpo_run_on_its_held_out_pairs(cached, capsys):
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(cached)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    logged = evals(cached)[4]
    assert f"rewards/margins {logged['eval_rewards/margins']:.4f}" in line
    assert f"loss {logged['eval_loss']:.4f}" in line and "held-out pairs" in line


def test_resume_is_bit_exact_and_reads_the_cached_reference(cached, base, pairs, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert run("dpo", base, pairs, out, "--steps", "2") == 0
    assert "computing" in capsys.readouterr().out
    stamp = (out / REFERENCE_FILE).stat().st_mtime_ns
    assert run("dpo", base, pairs, out, "--steps", "4") == 0
    assert "computing" not in capsys.readouterr().out
    assert (out / REFERENCE_FILE).stat().st_mtime_ns == stamp
    a, b = steps(cached), steps(out)
    assert [a[s]["loss"] for s in (3, 4)] == [b[s]["loss"] for s in (3, 4)]


def test_lora_reference_is_the_base_with_adapters_off(base, pairs, tmp_path):
    lora = ["--lora-rank", "4", "--steps", "2", "--loss", "ipo"]
    assert run("dpo", base, pairs, tmp_path / "c", *lora) == 0
    assert run("dpo", base, pairs, tmp_path / "o", *lora, "--reference", "online") == 0
    a, b = steps(tmp_path / "c"), steps(tmp_path / "o")
    # IPO at the start: delta is 0, so the loss is (1 / (2 beta))^2 = 25.
    assert a[1]["loss"] == pytest.approx(25.0, rel=1e-6)
    for step in (1, 2):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
    # The cached values are the base's own log-probs: no adapter, no second copy.
    tok = llmjax.load_tokenizer(base)
    data = build_preference_data(PreferenceDataConfig(str(pairs), T, 0, B), tok, 320)
    model, params = llmjax.from_hf(base, param_dtype="float32")
    with np.load(tmp_path / "c" / REFERENCE_FILE) as f:
        train_ref = f["train"]
    rows = data.train_pairs.rows(np.arange(B))
    want, _ = pair_logps(model, params, {k: v for k, v in rows.items() if k != "pair_index"})
    np.testing.assert_allclose(train_ref[:B], np.asarray(want), rtol=1e-5, atol=1e-5)
    trained = load_run(tmp_path / "c")
    assert trained.adapters is not None
    params = [k for k in manifest(tmp_path / "c", 2)["arrays"] if k.startswith("params/")]
    assert params and all(k.endswith(("/a", "/b")) for k in params)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_load_no_reference(loss, base, pairs, tmp_path, capsys):
    assert run("dpo", base, pairs, tmp_path / loss, "--loss", loss, "--steps", "2") == 0
    assert "reference log-probs" not in capsys.readouterr().out
    assert not (tmp_path / loss / REFERENCE_FILE).exists()
    record = steps(tmp_path / loss)[1]
    if loss == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(record)
    else:  # beta 2, gamma 0.5 on mean log-probs: the loss's value at step 1
        c, r = record["logps/chosen"], record["logps/rejected"]
        assert record["rewards/margins"] == pytest.approx(2.0 * (c - r), rel=1e-4, abs=1e-5)


def test_reward_model_scores_as_it_logged(base, pairs, tmp_path, capsys):
    out = tmp_path / "rm"
    assert run("reward", base, pairs, out, "--steps", "4") == 0
    logged = evals(out)[4]
    loaded = load_run(out)
    assert loaded.head is not None and loaded.head["score"].shape == (64,)
    batch = heldout_batch(base, pairs)
    flat = {k: np.swapaxes(v, 0, 1).reshape(-1, T) for k, v in batch.items()}
    scores = sequence_scores(
        loaded.model,
        loaded.params,
        loaded.head,
        flat["tokens"],
        positions=flat["positions"],
        segment_ids=flat["segment_ids"],
    )
    pairs_ = np.asarray(scores).reshape(2, -1).T
    assert logged["eval_accuracy"] == pytest.approx((pairs_[:, 0] > pairs_[:, 1]).mean())
    assert logged["eval_margin"] == pytest.approx((pairs_[:, 0] - pairs_[:, 1]).mean(), abs=1e-5)
    # The output head is not trained: the checkpoint holds the decoder without it.
    params = [k for k in manifest(out, 4)["arrays"] if k.startswith("params/")]
    assert "params/head/score" in params and "params/decoder/embed" in params
    assert not [k for k in params if "lm_head" in k]
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(out)]) == 0
    assert f"accuracy {logged['eval_accuracy']:.4f}" in capsys.readouterr().out
    # Resuming with other preference settings is refused, naming the change.
    assert run("reward", base, pairs, out, "--steps", "6", "--center-coef", "0.1") == 2
    assert "center_coef was 0.0, now 0.1" in capsys.readouterr().err
