"""``llmjax grpo`` end to end on a tiny Hugging Face base: TRL's metrics, completions logged, no
reference without beta, bit-exact resume with the sampler's key, rollout log-probs equal to the
training forward pass's, and reward functions that fail named in one line."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.data.prompts import PromptDataConfig
from llmjax.inference import SamplingConfig, continuation_batch, rollout
from llmjax.recipes import rl
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_pairs, write_prompts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("grpo") / "base")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("grpo-data"))


def grpo(base, files, out, *extra) -> int:
    args = ["grpo", "--base", str(base), "--data", str(files / "prompts.jsonl"), "--out", str(out)]
    args += ["--reward", f"{files / 'rewards.py'}:short_digits", "--batch-size", "2"]
    args += ["--num-generations", "4", "--max-new-tokens", "6", "--lr", "1e-2"]
    args += ["--set", "optim.schedule=constant", "--set", "loop.log_every=1"]
    args += ["--set", "loop.save_every=2", "--set", "loop.eval_every=2", "--set", "eval_prompts=4"]
    return main([*args, *extra])


def steps(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def test_grpo_logs_trls_metrics_and_its_completions(base, files, tmp_path):
    out = tmp_path / "run"
    assert grpo(base, files, out, "--steps", "2", "--log-completions", "1") == 0
    record = steps(out)[2]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/short_digits/mean"):
        assert key in record and math.isfinite(record[key]), key
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "entropy"):
        assert key in record
    assert "kl" not in record  # beta 0: no reference, no KL
    assert 1 <= record["completions/mean_length"] <= 6
    # One update per batch: the ratio is exactly 1, nothing is clipped.
    assert record["clip_ratio/region_mean"] == 0.0
    evals = [r for r in read_metrics(out) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [2] and "eval_rewards/short_digits/mean" in evals[0]
    logged = [json.loads(line) for line in (out / rl.COMPLETIONS_FILE).read_text().splitlines()]
    assert len(logged) == 2 * 2 * 4 and {r["step"] for r in logged} == {1, 2}
    assert {"prompt", "completion", "reward", "rewards/short_digits"} <= set(logged[0])
    # llmjax plot draws the reward curves beside the loss.
    assert main(["plot", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    from PIL import Image

    width, height = Image.open(tmp_path / "curves.png").size
    assert width > 1.8 * height  # two panels side by side


def test_resume_is_bit_exact_with_the_samplers_key(base, files, tmp_path):
    extra = ["--num-iterations", "2", "--beta", "0.1", "--epsilon-high", "0.28"]
    assert grpo(base, files, tmp_path / "a", "--steps", "4", *extra) == 0
    assert grpo(base, files, tmp_path / "b", "--steps", "2", *extra) == 0
    assert grpo(base, files, tmp_path / "b", "--steps", "4", *extra) == 0
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    for s in (3, 4):
        for key in ("loss", "reward", "kl", "completions/mean_length"):
            assert a[s][key] == b[s][key], (s, key)
    # Two updates per batch: the second sees a ratio away from 1.
    assert a[4]["kl"] > 0 and a[4]["clip_ratio/region_mean"] >= 0


def test_beta_zero_builds_no_reference(base, files, tmp_path):
    def frozen_of(beta):
        cfg = rl.GRPOConfig(
            base=str(base),
            data=PromptDataConfig(path=str(files / "prompts.jsonl"), batch_size=2),
            rewards=(f"{files / 'rewards.py'}:short_digits",),
            beta=beta,
        )
        cfg, b, data = rl.prepare(cfg, tmp_path / f"b{beta}", log=lambda *_: None)
        return set(rl.task(cfg, b, data, tmp_path, log=lambda *_: None).frozen)

    assert "reference" not in frozen_of(0.0)
    assert "reference" in frozen_of(0.04)


def test_rollout_logprobs_equal_the_training_forward_pass(base):
    model, params = llmjax.from_hf(base, param_dtype="float32")
    prompts = jnp.asarray([[1, 20, 30, 40], [1, 50, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4, 2], jnp.int32)
    r = rollout(
        model, params, prompts, lengths, jax.random.key(0), max_new=8, sampling=SamplingConfig(1.0)
    )
    batch = continuation_batch(prompts, lengths, r, 4 + 8 - 1)
    logits = model.apply(
        params, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    forward = np.asarray(rl.token_logprobs(logits, batch["targets"]))
    mask = np.asarray(r.completion_mask_BN)
    for i in range(2):
        n = int(mask[i].sum())
        start = int(lengths[i]) - 1  # the slot that predicts the first completion token
        np.testing.assert_allclose(
            forward[i, start : start + n], np.asarray(r.logprobs_BN)[i, :n], atol=1e-5
        )


def test_a_reward_returning_nan_is_one_line_naming_it(base, files, tmp_path, capsys):
    args = ["--steps", "1", "--reward", f"{files / 'rewards.py'}:broken"]
    assert grpo(base, files, tmp_path / "nan", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken" in err[0] and "nan" in err[0].lower()


def test_a_trained_reward_model_scores_the_completions(base, files, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    rm = tmp_path / "rm"
    common = ["--batch-size", "4", "--seq-len", "32", "--steps", "2"]
    assert (
        main(["reward", "--base", str(base), "--data", str(pairs), "--out", str(rm), *common]) == 0
    )
    out = tmp_path / "run"
    args = ["--steps", "1", "--reward-model", str(rm), "--reward-weights", "1,0.5"]
    assert grpo(base, files, out, *args) == 0
    record = steps(out)[1]
    assert {"rewards/short_digits/mean", "rewards/reward_model/mean"} <= set(record)
    # The logged reward is the weighted sum: short_digits + 0.5 * reward_model, per completion.
    want = record["rewards/short_digits/mean"] + 0.5 * record["rewards/reward_model/mean"]
    assert record["reward"] == pytest.approx(want, rel=1e-5, abs=1e-6)
