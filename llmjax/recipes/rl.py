"""Reinforcement learning on verifiable rewards: GRPO, with Dr. GRPO's and DAPO's options.

A recipe module is configs, a loss and data. The data is ``llmjax.data.prompts`` (prompts and the
fields reward functions read); the loss is ``llmjax.losses.policy_loss``; what trains over the base
(every parameter, a subset, or LoRA adapters over a frozen, optionally quantized base) is the
fine-tuning recipes' ``Trainable``.

Each step, before the jitted update, the loop calls the task's ``rollout`` with the current
parameters (the sharded training arrays themselves, no copy):

1. a jitted function repeats each of the step's ``P`` prompts ``G`` times and samples the
   completions with ``llmjax.inference.rollout`` (the ``generate`` sampler as a pure function),
   lays prompt + completion out as a training batch and, when ``num_iterations > 1``, scores the
   sampled tokens under the sampling parameters (the ratio's denominator);
2. on the host, the completions are decoded and scored by the reward functions
   (``llmjax.rewards``) on text, with the record's other fields as keyword arguments;
3. advantages are normalised per group of ``G`` (``llmjax.losses.group_advantages``) and placed
   beside the batch, which the update then reads ``num_iterations`` times.

The sampling key is a function of the seed and the step, so a resumed run samples exactly what
the interrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax import distributed
from llmjax.config import ConfigError, ModelConfig
from llmjax.data.hf_tokenizer import keep_copy
from llmjax.data.prompts import PromptDataConfig, build_prompt_data
from llmjax.lora import LoraConfig
from llmjax.losses import (
    ADVANTAGE_SCALES,
    POLICY_LOSSES,
    group_advantages,
    policy_loss,
    real_tokens,
    token_entropy,
    varied_groups,
)
from llmjax.losses.core import add_router_loss, apply_routed, target_logprobs
from llmjax.recipes.sft import check_tuning, load_base, trainable
from llmjax.rewards import load_reward, model_reward, reward_metrics, reward_name, score
from llmjax.train import LoopConfig, OptimizerConfig, Task, TrainResult, rundir, train

COMPLETIONS_FILE = "completions.jsonl"


@dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run. ``data.batch_size`` counts prompts: a step trains on ``batch_size *
    num_generations`` completions."""

    base: str = ""  # a llmjax run directory or a Hugging Face model directory
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0)
    )
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=200, eval_every=50, save_every=50, sample_tokens=0)
    )
    rewards: tuple[str, ...] = ("answer_match",)  # built-in names or module:function
    reward_model: str = ""  # a reward run or HF ...ForSequenceClassification, scored after them
    reward_weights: tuple[float, ...] = ()  # empty: 1 each, the reward model's last
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    beta: float = 0.0  # KL to the reference (k3); 0 builds no reference
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: epsilon; DAPO's clip-higher sets it larger (0.28)
    loss_type: str = "grpo"  # grpo, bnpo, dapo or dr_grpo
    scale_rewards: str = "group"  # group (GRPO), batch, or none (Dr. GRPO)
    num_iterations: int = 1  # updates per batch of completions
    mask_truncated_completions: bool = False  # DAPO's overlong masking
    dynamic_sampling: bool = False  # DAPO: groups whose rewards are all equal leave the loss
    log_completions_every: int = 0  # steps; completions with their rewards to completions.jsonl
    eval_prompts: int = 64  # held-out prompts decoded greedily and scored at each eval
    lora: LoraConfig | None = None
    quantize_base: str = ""
    quantize_keep: str = "lm_head"
    trainable: str = ""
    # The base's layers: scanned (stacked, one lax.scan) or unrolled, which regexes that choose
    # some layers only (LoRA targets, trainable, quantize_keep) need.
    scan_layers: bool = True
    model: ModelConfig | None = None
    name: str = "grpo"

    # GRPO's advantages compare a prompt's completions with each other: a group needs two.
    MIN_GENERATIONS: ClassVar[int] = 2

    def __post_init__(self):
        G = self.MIN_GENERATIONS
        checks = [
            (self.num_generations >= G, f"num_generations must be at least {G}"),
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature > 0, "temperature must be positive (GRPO samples)"),
            (self.beta >= 0, f"beta={self.beta}: must be >= 0 (0: no reference)"),
            (0 < self.epsilon < 1, f"epsilon={self.epsilon}: must lie in (0, 1)"),
            (self.epsilon_high >= 0, f"epsilon_high={self.epsilon_high}: must be >= 0"),
            (
                self.loss_type in POLICY_LOSSES,
                f"loss_type={self.loss_type!r}: expected one of {', '.join(POLICY_LOSSES)}",
            ),
            (
                self.scale_rewards in ADVANTAGE_SCALES,
                f"scale_rewards={self.scale_rewards!r}: expected one of "
                f"{', '.join(ADVANTAGE_SCALES)}",
            ),
            (self.num_iterations >= 1, "num_iterations must be at least 1"),
            (bool(self.rewards or self.reward_model), "give a --reward or a --reward-model"),
            (
                not self.reward_weights or len(self.reward_weights) == self.num_rewards,
                f"{len(self.reward_weights)} reward weights for {self.num_rewards} rewards; "
                "give one weight per --reward (and one for --reward-model, last)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_tuning(self)

    @property
    def num_rewards(self) -> int:
        return len(self.rewards) + bool(self.reward_model)


def rollout_logprobs(cfg, model, params, batch):
    """float32 ``[B, T]``: each target's log-prob under ``params`` at the sampling temperature,
    ``loop.ce_chunk`` tokens per device projected to the vocabulary at a time (no ``[B, T, V]``
    logits; 0: from the full logits)."""
    return target_logprobs(
        model,
        params,
        batch["tokens"],
        batch["targets"],
        temperature=cfg.temperature,
        chunk=cfg.loop.ce_chunk,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )


def token_logprobs(logits_BTV, targets_BT):
    """float32 ``[B, T]``: the log-probability of each target under its logits."""
    logits = logits_BTV.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def to_host(x) -> np.ndarray:
    """Every value of a global array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _sampler(cfg: GRPOConfig, model, params_of, stops, width: int):
    """The jitted rollout: ``(params, frozen, tokens_PL, lengths_P, key)`` -> the training batch
    of the ``P * G`` completions and the sampled tokens, lengths and stops."""
    from llmjax.inference import SamplingConfig, continuation_batch, rollout

    G, N = cfg.num_generations, cfg.max_new_tokens
    sampling = SamplingConfig(temperature=cfg.temperature)

    @jax.jit
    def sample(params, frozen, tokens_PL, lengths_P, key):
        policy = params_of(params, frozen)
        tokens = jnp.repeat(tokens_PL, G, axis=0)
        lengths = jnp.repeat(lengths_P, G)
        r = rollout(
            model, policy, tokens, lengths, key, max_new=N, sampling=sampling, stop_ids=stops
        )
        batch = continuation_batch(tokens, lengths, r, width + N - 1)
        if cfg.num_iterations > 1:  # the sampling policy's log-probs, the ratio's denominator
            batch["old_logps"] = rollout_logprobs(cfg, model, policy, batch)
        return batch, r.tokens_BN, r.lengths_B, r.stopped_B

    return sample


def reward_fns(cfg, tokenizer=None):
    fns = [load_reward(spec) for spec in cfg.rewards]
    if cfg.reward_model:
        fn = model_reward(cfg.reward_model)
        theirs = fn.reward_model.tokenizer
        if tokenizer is not None and theirs is not None and theirs.sha256 != tokenizer.sha256:
            raise ConfigError(
                f"--reward-model {cfg.reward_model} was trained with another tokenizer (sha256 "
                f"{theirs.sha256[:12]}, the policy's {tokenizer.sha256[:12]}); it scores token "
                "ids, so train it from the same base (llmjax reward --base ...)"
            )
        fns.append(fn)
    weights = cfg.reward_weights or (1.0,) * len(fns)
    return list(zip(fns, weights, strict=True))


@dataclass
class Scored:
    """The completions of one rollout, decoded and scored on the host."""

    total: np.ndarray  # float32 [N]: the weighted sum of the reward functions
    per_name: dict  # each function's rewards [N]
    stopped: np.ndarray  # bool [N]: ended on a stop token (else cut at max_new_tokens)
    metrics: dict  # rewards/<name>/mean, completions/*


class Scorer:
    """Decodes sampled tokens and scores them with the run's reward functions, which get the
    record's fields plus ``prompt_ids`` and ``completion_ids`` (the stop token included)."""

    def __init__(self, cfg, data, rewards, out_dir):
        self.cfg, self.data, self.tok, self.rewards = cfg, data, data.tokenizer, rewards
        self.log_path = Path(out_dir) / COMPLETIONS_FILE
        self.main = distributed.is_main_process()

    def __call__(self, index_N, tokens_NN, lengths_N, stopped_N, step: int) -> Scored:
        prompts = [self.data.train_prompts.prompts[i] for i in index_N]
        ended = lengths_N + stopped_N
        texts = [self.tok.decode(list(t[:n])) for t, n in zip(tokens_NN, lengths_N, strict=True)]
        fields = self.data.fields_of("train", index_N)
        fields["prompt_ids"] = [list(p.ids) for p in prompts]
        fields["completion_ids"] = [list(t[:n]) for t, n in zip(tokens_NN, ended, strict=True)]
        prompt_texts = [p.text for p in prompts]
        total, per_name = score(self.rewards, prompt_texts, texts, fields)
        metrics = reward_metrics(per_name)
        metrics.update(
            {
                "completions/mean_length": float(ended.mean()),
                "completions/max_length": float(ended.max()),
                "completions/clipped_ratio": float(1.0 - stopped_N.mean()),
            }
        )
        every = self.cfg.log_completions_every
        if self.main and every and step % every == 0:
            with open(self.log_path, "a") as f:
                for i, (p, c) in enumerate(zip(prompt_texts, texts, strict=True)):
                    row = {"step": step, "prompt": p, "completion": c, "reward": float(total[i])}
                    row.update({f"rewards/{k}": float(v[i]) for k, v in per_name.items()})
                    f.write(json.dumps(row) + "\n")
        return Scored(total, per_name, stopped_N.astype(bool), metrics)


def place_like(x, like):
    """Host values ``x`` (the same on every process) as a global array sharded as ``like``."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, like.sharding, lambda idx: x[idx])


def make_rollout(cfg: GRPOConfig, model, params_of, data, rewards, out_dir):
    """The task's ``rollout`` hook (see the module docstring)."""
    G = cfg.num_generations
    sample = _sampler(cfg, model, params_of, tuple(data.tokenizer.stop_ids), data.width)
    scorer = Scorer(cfg, data, rewards, out_dir)

    def hook(params, frozen, batch, key, step):
        out, tokens_NN, lengths_N, stopped_N = sample(
            params, frozen, batch["tokens"], batch["lengths"], key
        )
        index = np.repeat(to_host(batch["index"]), G)
        scored = scorer(index, *map(to_host, (tokens_NN, lengths_N, stopped_N)), step)
        advantages, m = group_advantages(scored.total, G, scale=cfg.scale_rewards)
        keep = np.ones(len(scored.total), np.float32)
        if cfg.mask_truncated_completions:
            keep *= scored.stopped
        if cfg.dynamic_sampling:
            keep *= np.repeat(np.asarray(varied_groups(scored.total, G)), G)
        row = out["segment_ids"][:, 0]
        out = {
            **out,
            "advantages": place_like(np.asarray(advantages, np.float32), row),
            "keep": place_like(keep, row),
        }
        metrics = {k: float(v) for k, v in m.items()}
        metrics.update(scored.metrics)
        metrics["completions/kept_ratio"] = float(keep.mean())
        return out, metrics

    return hook


def make_loss(cfg: GRPOConfig, model, params_of, reference):
    """``loss(params, frozen, batch, rng)``: the clipped policy objective on the rollout's batch,
    plus a mixture-of-experts policy's router losses (``llmjax.losses.core.router_loss``)."""

    def loss(params, frozen, batch, rng):
        logits, moe_aux = apply_routed(
            model,
            params_of(params, frozen, rng),
            batch["tokens"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        logits = logits.astype(jnp.float32) / cfg.temperature
        logps = token_logprobs(logits, batch["targets"])
        mask = batch["loss_mask"] * batch["keep"][:, None]
        # One update per batch: the sampling policy is the current one, so the ratio is exactly 1.
        old = batch["old_logps"] if cfg.num_iterations > 1 else jax.lax.stop_gradient(logps)
        value, m = policy_loss(
            logps,
            old,
            batch["advantages"],
            mask,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high or None,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
            ref_logps_BT=reference(frozen, batch) if cfg.beta > 0 else None,
            beta=cfg.beta,
        )
        value, m = add_router_loss(model.config, moe_aux, value, m)
        m["entropy"] = token_entropy(jax.lax.stop_gradient(logits), mask)
        m["num_tokens"] = real_tokens(batch)
        return value, m

    return loss


def reference_logps(cfg, model, base_params, frozen, frozen_axes):
    """``reference(frozen, batch)`` for the KL term, None without one (``beta`` 0); adds a frozen
    copy of the base for full fine-tuning."""
    from llmjax.inference.quantize import QuantizedModel

    if cfg.beta == 0:
        return None
    if cfg.lora is not None:  # the base with the adapters off
        ref_model, name = (QuantizedModel(model) if cfg.quantize_base else model), "base"
    else:
        # A copy: the policy's own arrays are donated to each step's update.
        frozen["reference"] = jax.tree.map(jnp.copy, base_params)
        frozen_axes["reference"] = model.param_axes()
        ref_model, name = model, "reference"

    def reference(frozen, batch):
        return rollout_logprobs(cfg, ref_model, jax.lax.stop_gradient(frozen[name]), batch)

    return reference


def evaluation(cfg, model, params_of, data, rewards):
    """Greedy completions of held-out prompts, scored by the reward functions."""
    from llmjax.inference import generate

    prompts = data.heldout[: cfg.eval_prompts]
    if not prompts:
        return None
    merged = jax.jit(params_of)
    fields = data.fields_of("heldout", np.arange(len(prompts)))

    def evaluate(params, frozen) -> dict:
        out = generate(
            model,
            merged(params, frozen),
            [p.ids for p in prompts],
            max_new_tokens=cfg.max_new_tokens,
            temperature=0.0,
            stop_tokens=tuple(data.tokenizer.stop_ids),
        )
        completions = [data.tokenizer.decode(t) for t in out.tokens]
        # The stop token a greedy completion ended on is not returned: the first stop id stands
        # for it (the eos of every tokenizer here).
        stop = list(data.tokenizer.stop_ids[:1])
        ids = [t + stop if s else t for t, s in zip(out.tokens, out.stopped, strict=True)]
        extra = {"prompt_ids": [list(p.ids) for p in prompts], "completion_ids": ids}
        texts = [p.text for p in prompts]
        total, per_name = score(rewards, texts, completions, {**fields, **extra})
        metrics = {"eval_reward": float(total.mean())}
        metrics.update({f"eval_rewards/{k}/mean": float(v.mean()) for k, v in per_name.items()})
        return metrics

    return evaluate


def task(cfg: GRPOConfig, base, data, out_dir, log=print) -> Task:
    model = base.model
    t = trainable(cfg, model, base.params)
    frozen, frozen_axes = dict(t.frozen), dict(t.frozen_axes)
    reference = reference_logps(cfg, model, base.params, frozen, frozen_axes)
    rewards = reward_fns(cfg, data.tokenizer)
    names = [reward_name(fn) for fn, _ in rewards]
    log(f"rewards: {', '.join(names)}; {cfg.num_generations} completions per prompt")
    settings = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in ("base", "data", "optim", "loop", "lora", "model", "name")
        and f.name not in ("log_completions_every", "eval_prompts", "trainable")
        and not f.name.startswith("quantize")
    }
    t.log_count(log)
    return Task(
        params=t.initial,
        axes=t.axes,
        loss=make_loss(cfg, model, t.params_of, reference),
        train=data.train,
        heldout=None,
        model=model.config,
        frozen=frozen,
        frozen_axes=frozen_axes,
        evaluate=evaluation(cfg, model, t.params_of, data, rewards),
        identity={
            "tokenizer_sha256": data.tokenizer.sha256,
            "data_fingerprint": data.fingerprint,
            "base": base.source["sha256"],
            "trainable": t.identity,
            "rl": settings,
        },
        start_metrics=t.start_metrics,
        eval_perplexity=False,
        rollout=make_rollout(cfg, model, t.params_of, data, rewards, out_dir),
        updates_per_batch=cfg.num_iterations,
    )


def prepare(cfg: GRPOConfig, out_dir, log=print):
    base = load_base(cfg.base, cfg.scan_layers)
    cfg = dataclasses.replace(cfg, model=base.model.config, base=base.source["path"])
    data = build_prompt_data(cfg.data, base.tokenizer, cfg.model.vocab_size)
    need = data.width + cfg.max_new_tokens
    if need > cfg.model.max_seq_len:
        raise ConfigError(
            f"the longest prompt ({data.width} tokens) plus max_new_tokens={cfg.max_new_tokens} "
            f"is {need}, beyond the base model's max_seq_len={cfg.model.max_seq_len}; lower "
            "data.max_prompt_len or max_new_tokens"
        )
    keep_copy(data.tokenizer, out_dir, cfg.name)
    log(f"base: {base.source['kind']} {base.source['path']} ({base.model})")
    log(f"data: {data.description}")
    return cfg, base, data


def run(cfg: GRPOConfig, out_dir, log=print) -> TrainResult:
    """Train (or resume) a GRPO policy in ``out_dir``."""
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    with rundir.hold(out_dir):
        cfg, base, data = prepare(cfg, out_dir, log)
        t = task(cfg, base, data, out_dir, log)
        result = train(cfg, t, out_dir, log=log)
    for k, v in result.eval_metrics.items():
        log(f"{k} {v:.4f}")
    return result
