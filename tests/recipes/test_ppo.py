"""``llmjax ppo`` end to end on a tiny Hugging Face base: the critic trains beside the policy,
credit reaches every token through GAE, resume is bit-exact, and the saved run loads as its
policy (the critic stays in the checkpoint)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.recipes import ppo
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_prompts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("ppo") / "base")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("ppo-data"))


def run_ppo(base, files, out, *extra) -> int:
    args = ["ppo", "--base", str(base), "--data", str(files / "prompts.jsonl"), "--out", str(out)]
    args += ["--reward", f"{files / 'rewards.py'}:short_digits", "--batch-size", "4"]
    args += ["--max-new-tokens", "6", "--lr", "1e-2", "--num-iterations", "2"]
    args += ["--set", "optim.schedule=constant", "--set", "loop.log_every=1"]
    args += ["--set", "loop.save_every=2", "--set", "loop.eval_every=2", "--set", "eval_prompts=4"]
    return main([*args, *extra])


def steps(out) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def test_ppo_trains_policy_and_critic_and_resumes_bit_exact(base, files, tmp_path):
    assert run_ppo(base, files, tmp_path / "a", "--steps", "4") == 0
    assert run_ppo(base, files, tmp_path / "b", "--steps", "2") == 0
    assert run_ppo(base, files, tmp_path / "b", "--steps", "4") == 0
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    for s in (3, 4):
        for key in ("loss", "reward", "value_loss", "objective/kl"):
            assert a[s][key] == b[s][key], (s, key)
    for key in ("policy_loss", "value_clip_frac", "entropy", "clip_ratio/region_mean"):
        assert key in a[4]
    # The KL penalty is measured from step 1 (0 there: the policy is the reference).
    assert a[1]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert a[4]["objective/kl"] != 0.0
    # The checkpoint holds the policy and the critic; the run loads as its policy.
    manifest = json.loads((tmp_path / "a" / "checkpoints" / "4" / "manifest.json").read_text())
    names = [k for k in manifest["arrays"] if k.startswith("params/")]
    assert "params/critic/head/score" in names and "params/policy/embed" in names
    model, params = llmjax.load(tmp_path / "a")
    base_model, base_params = llmjax.from_hf(base, param_dtype="float32")
    moved = jax.tree.map(
        lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), params, base_params
    )
    assert max(jax.tree.leaves(moved)) > 0


def test_credit_puts_the_score_on_the_last_token_and_penalises_kl():
    cfg = ppo.PPOConfig(beta=0.5, gamma=1.0, lam=1.0, whiten_advantages=False)
    credit = ppo._credit(cfg)
    mask = np.asarray([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32)
    old = np.asarray([[0, -1.0, -2.0, -1.0, 0], [0, 0, -0.5, -0.5, -0.5]], np.float32)
    ref = np.asarray([[0, -1.5, -2.0, -0.5, 0], [0, 0, -0.5, -1.0, -0.5]], np.float32)
    values = np.zeros_like(mask)
    scores = np.asarray([1.0, -1.0], np.float32)
    adv, returns, m = credit(mask, old, ref, values, scores)
    # gamma = lam = 1 and zero values: the advantage is the reward to go.
    rewards = -0.5 * (old - ref) * mask
    rewards[0, 3] += 1.0
    rewards[1, 4] += -1.0
    to_go = np.flip(np.cumsum(np.flip(rewards, 1), 1), 1) * mask
    np.testing.assert_allclose(np.asarray(adv), to_go, atol=1e-6)
    np.testing.assert_allclose(np.asarray(returns), to_go, atol=1e-6)
    assert float(m["objective/kl"]) == pytest.approx(((old - ref) * mask).sum(1).mean())


def test_ppo_settings_are_checked():
    with pytest.raises(llmjax.ConfigError, match="dynamic"):
        ppo.PPOConfig(dynamic_sampling=True)
    with pytest.raises(llmjax.ConfigError, match="gamma and lam"):
        ppo.PPOConfig(lam=1.5)
