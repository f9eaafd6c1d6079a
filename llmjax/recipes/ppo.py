"""PPO on verifiable rewards: a policy and a critic (the decoder plus a scalar head at every token).

The rollout is GRPO's (``llmjax.recipes.rl``): completions sampled inside a jitted function with
the training parameters, decoded and scored by reward functions (or a trained reward model) on
the host. What differs is the credit: each completion token gets the reward
``-beta * (log pi - log pi_ref)`` (the per-token KL penalty of RLHF's PPO, TRL's ``kl_coef``),
its last token the sequence's score as well; GAE (``gamma``, ``lam``) over the critic's values
turns those into per-token advantages (whitened over the batch) and the critic's targets. The
update then runs ``num_iterations`` epochs on the batch: the clipped policy objective, the
clipped value loss times ``vf_coef``, minus ``ent_coef`` times the entropy.

The critic is a second copy of what trains of the base (the whole decoder, or its own LoRA
adapters over the same frozen base) with a scalar head; the trainable tree is
``{"policy": ..., "critic": {"decoder": ..., "head": {"score": [D]}}}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax.config import ConfigError
from llmjax.losses import gae, policy_loss, real_tokens, token_entropy, value_loss
from llmjax.losses.core import add_router_loss, apply_routed, router_loss
from llmjax.recipes import rl
from llmjax.recipes.sft import trainable
from llmjax.scalar_head import check_head, init_score_head, score_axes
from llmjax.train import Task, TrainResult, rundir, train


@dataclass(frozen=True)
class PPOConfig(rl.GRPOConfig):
    """One PPO run. ``beta`` is the per-token KL penalty in the reward (0: no reference)."""

    num_generations: int = 1  # completions per prompt
    num_iterations: int = 4  # epochs over each batch of completions (TRL's num_ppo_epochs)
    beta: float = 0.05
    loss_type: str = "bnpo"  # the token mean over the batch, as PPO's masked mean
    scale_rewards: str = "none"  # GRPO's group scaling does not apply; advantages are whitened
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    ent_coef: float = 0.0
    whiten_advantages: bool = True
    name: str = "ppo"

    MIN_GENERATIONS: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        checks = [
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must lie in [0, 1]"),
            (self.vf_coef >= 0 and self.ent_coef >= 0, "vf_coef and ent_coef must be >= 0"),
            (self.cliprange_value > 0, "cliprange_value must be positive"),
            (not self.dynamic_sampling, "--dynamic-sampling is GRPO's (groups of completions)"),
            (self.scale_rewards == "none", "scale_rewards is GRPO's; PPO whitens advantages"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def _values(model, params, head, batch, return_aux: bool = False):
    """The critic's value at every slot ``[B, T]``: its head on the final hidden states.

    ``return_aux=True`` returns ``(values, moe_aux)`` with a mixture-of-experts decoder's router
    losses (``llmjax.losses.core.apply_routed``; None for a dense one), for the loss that trains it.
    """
    hidden, moe_aux = apply_routed(
        model,
        params,
        batch["tokens"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        return_hidden=True,
    )
    values = jnp.einsum("BTD,D->BT", hidden, check_head(model, head).astype(jnp.float32))
    return (values, moe_aux) if return_aux else values


def critic_of(model, params_of):
    """``critic(params, frozen, batch, return_aux=False)``: the values ``[B, T]`` of the critic in
    the trainable tree's ``params["critic"]`` (``_values``), its decoder read through ``params_of``
    (the fine-tuning recipes' ``Trainable.params_of``)."""

    def critic(params, frozen, batch, return_aux=False):
        c = params["critic"]
        return _values(model, params_of(c["decoder"], frozen), c["head"], batch, return_aux)

    return critic


def _whiten(x_BT, mask_BT):
    n = jnp.maximum(mask_BT.sum(), 1.0)
    mean = (x_BT * mask_BT).sum() / n
    var = (jnp.square(x_BT - mean) * mask_BT).sum() / n
    return jnp.where(mask_BT > 0, (x_BT - mean) * jax.lax.rsqrt(var + 1e-8), 0.0)


def _credit(cfg: PPOConfig):
    """Jitted: per-token rewards, GAE advantages and returns from the sequences' scores."""

    @jax.jit
    def credit(mask_BT, old_logps_BT, ref_logps_BT, values_BT, scores_B):
        B, T = mask_BT.shape
        kl_BT = (old_logps_BT - ref_logps_BT) * mask_BT  # k1: its sum is the sequence's log ratio
        last_B = jnp.max(jnp.where(mask_BT > 0, jnp.arange(T)[None], -1), axis=1)
        at_end = (jnp.arange(T)[None] == last_B[:, None]) & (last_B[:, None] >= 0)
        rewards_BT = -cfg.beta * kl_BT + jnp.where(at_end, scores_B[:, None], 0.0)
        adv, returns = gae(rewards_BT, values_BT, mask_BT, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:
            adv = _whiten(adv, mask_BT)
        metrics = {
            "objective/kl": kl_BT.sum(1).mean(),
            "objective/non_score_reward": (-cfg.beta * kl_BT).sum(1).mean(),
        }
        return adv, returns, metrics

    return credit


def make_rollout(cfg: PPOConfig, model, policy_of, critic, reference, data, rewards, out_dir):
    """The rollout hook: sample, score on the host, then credit each token."""
    from llmjax.inference import SamplingConfig, continuation_batch, rollout

    G, N, L = cfg.num_generations, cfg.max_new_tokens, data.width
    stops = tuple(data.tokenizer.stop_ids)
    sampling = SamplingConfig(temperature=cfg.temperature)
    scorer = rl.Scorer(cfg, data, rewards, out_dir)
    credit = _credit(cfg)

    @jax.jit
    def sample(params, frozen, tokens_PL, lengths_P, key):
        policy = policy_of(params, frozen)
        tokens, lengths = jnp.repeat(tokens_PL, G, axis=0), jnp.repeat(lengths_P, G)
        r = rollout(
            model, policy, tokens, lengths, key, max_new=N, sampling=sampling, stop_ids=stops
        )
        batch = continuation_batch(tokens, lengths, r, L + N - 1)
        batch["old_logps"] = rl.rollout_logprobs(cfg, model, policy, batch)
        batch["old_values"] = critic(params, frozen, batch)
        ref = reference(frozen, batch) if reference is not None else batch["old_logps"]
        return batch, ref, r.tokens_BN, r.lengths_B, r.stopped_B

    def hook(params, frozen, batch, key, step):
        out, ref, tokens, lengths, stopped = sample(
            params, frozen, batch["tokens"], batch["lengths"], key
        )
        index = np.repeat(rl.to_host(batch["index"]), G)
        scored = scorer(index, *map(rl.to_host, (tokens, lengths, stopped)), step)
        keep = scored.stopped.astype(np.float32) if cfg.mask_truncated_completions else None
        row = out["segment_ids"][:, 0]
        keep = rl.place_like(np.ones(len(index), np.float32) if keep is None else keep, row)
        mask = out["loss_mask"] * keep[:, None]
        scores = rl.place_like(scored.total, row)
        adv, returns, m = credit(mask, out["old_logps"], ref, out["old_values"], scores)
        out = {**out, "advantages": adv, "returns": returns, "keep": keep}
        metrics = {k: float(v) for k, v in jax.device_get(m).items()}
        metrics["reward"] = float(scored.total.mean())
        metrics["reward_std"] = float(scored.total.std(ddof=1)) if len(index) > 1 else 0.0
        metrics.update(scored.metrics)
        return out, metrics

    return hook


def make_loss(cfg: PPOConfig, model, policy_of, critic):
    """The clipped policy objective + ``vf_coef`` * the clipped value loss - ``ent_coef`` *
    entropy, on the rollout's batch; ``critic(params, frozen, batch, return_aux)`` gives the
    values (see ``critic_of``).

    Mixture-of-experts decoders add their router losses (``llmjax.losses.core.router_loss``): the
    policy's as they are, reported as ``moe/*``; the critic's times ``vf_coef``, as its value loss,
    so it keeps their ratio to its own loss, reported as ``moe/critic_*``.
    """

    def loss(params, frozen, batch, rng):
        logits, moe_aux = apply_routed(
            model,
            policy_of(params, frozen, rng),
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        logits = logits.astype(jnp.float32) / cfg.temperature
        mask = batch["loss_mask"] * batch["keep"][:, None]
        p_loss, m = policy_loss(
            rl.token_logprobs(logits, batch["targets"]),
            batch["old_logps"],
            batch["advantages"],
            mask,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high or None,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
        )
        values, critic_aux = critic(params, frozen, batch, return_aux=True)
        v_loss, vm = value_loss(
            values,
            batch["old_values"],
            batch["returns"],
            mask,
            clip=cfg.cliprange_value,
        )
        entropy = token_entropy(logits if cfg.ent_coef else jax.lax.stop_gradient(logits), mask)
        m.update(value_loss=vm["value_loss"], value_clip_frac=vm["value_clip_frac"])
        m["policy_loss"] = jax.lax.stop_gradient(p_loss)
        m["entropy"] = jax.lax.stop_gradient(entropy)
        m["num_tokens"] = real_tokens(batch)
        total = p_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy
        total, m = add_router_loss(model.config, moe_aux, total, m)
        if critic_aux:
            extra, rm = router_loss(model.config, critic_aux)
            total = total + cfg.vf_coef * extra
            m.update({k.replace("moe/", "moe/critic_"): v for k, v in rm.items()})
        return total, m

    return loss


def task(cfg: PPOConfig, base, data, out_dir, log=print) -> Task:
    model = base.model
    t = trainable(cfg, model, base.params)
    frozen, frozen_axes = dict(t.frozen), dict(t.frozen_axes)
    reference = rl.reference_logps(cfg, model, base.params, frozen, frozen_axes)
    rewards = rl.reward_fns(cfg, data.tokenizer)

    def policy_of(params, frozen, rng=None):
        return t.params_of(params["policy"], frozen, rng)

    critic = critic_of(model, t.params_of)

    head = init_score_head(model, jax.random.PRNGKey(cfg.loop.seed + 1))
    if callable(t.initial):  # LoRA: the critic gets adapters of its own over the same base

        def initial(key):
            kp, kc = jax.random.split(key)
            return {"policy": t.initial(kp), "critic": {"decoder": t.initial(kc), "head": head}}

    else:  # a copy: policy and critic arrays are donated to the update separately
        critic_start = jax.tree.map(jnp.copy, t.initial)
        initial = {"policy": t.initial, "critic": {"decoder": critic_start, "head": head}}
    settings = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in ("base", "data", "optim", "loop", "lora", "model", "name", "trainable")
        and f.name not in ("log_completions_every", "eval_prompts")
        and not f.name.startswith("quantize")
    }
    log(f"rewards: {', '.join(rl.reward_name(fn) for fn, _ in rewards)}; critic: a copy")
    count = 2 * t.count + model.config.d_model
    log(f"trainable parameters: {count:,} (policy and critic)")
    return Task(
        params=initial,
        axes={"policy": t.axes, "critic": {"decoder": t.axes, "head": score_axes(model)}},
        loss=make_loss(cfg, model, policy_of, critic),
        train=data.train,
        heldout=None,
        model=model.config,
        frozen=frozen,
        frozen_axes=frozen_axes,
        evaluate=rl.evaluation(cfg, model, lambda p, f: policy_of(p, f), data, rewards),
        identity={
            "tokenizer_sha256": data.tokenizer.sha256,
            "data_fingerprint": data.fingerprint,
            "base": base.source["sha256"],
            "trainable": t.identity,
            "rl": settings,
            "critic": "score",
        },
        start_metrics={"trainable_params": count},
        eval_perplexity=False,
        rollout=make_rollout(cfg, model, policy_of, critic, reference, data, rewards, out_dir),
        updates_per_batch=cfg.num_iterations,
    )


def run(cfg: PPOConfig, out_dir, log=print) -> TrainResult:
    """Train (or resume) a PPO policy and its critic in ``out_dir``."""
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    with rundir.hold(out_dir):
        cfg, base, data = rl.prepare(cfg, out_dir, log)
        result = train(cfg, task(cfg, base, data, out_dir, log), out_dir, log=log)
    for k, v in result.eval_metrics.items():
        log(f"{k} {v:.4f}")
    return result
