"""Losses as pure functions, usable with or without the training loop.

A loss for the loop has the signature ``loss(params, frozen, batch, rng) -> (loss, aux)``:
``params`` are the trainable parameters, ``frozen`` a dict of frozen pytrees (a reference model,
a teacher, a quantized base; empty for pretraining), ``batch`` a dict of ``[B, ...]`` arrays.
``aux`` is a dict of scalars with two reserved keys:

- ``tokens``: how many tokens (or examples) ``loss`` and every other metric average over. Gradient
  accumulation weights each micro-batch by it, so accumulated steps equal one step on the whole
  batch.
- ``num_tokens``: real (non-padding) input tokens processed; the loop's tokens/s and TRL's
  ``num_tokens`` count these.

Chunked cross-entropy: ``next_token_loss`` and ``target_logprobs`` read the model's hidden
states and project ``chunk`` tokens per device to the vocabulary at a time
(``chunked_logit_stats``, with a custom VJP), so float32 ``[B, T, V]`` logits never exist;
``chunk=0`` takes the full logits. ``target_stats`` gives each token's target logit, ``log Z`` and
arg-max hit either way.

Knowledge distillation: ``distill_loss`` (forward KL, reverse KL or generalized JSD between student
and teacher logits) and ``teacher_top_k`` / ``distill_loss_top_k`` (a teacher's top-k, cacheable
offline); ``sequence_logprobs`` scores whole sequences.

Preference tuning, on ``[B]`` per-pair log-probs or rewards with TRL's metric names:
``preference_loss`` (DPO, cDPO, hinge, IPO, robust DPO), ``simpo_loss``, ``orpo_loss`` and
``reward_model_loss`` (Bradley-Terry).

Reinforcement learning on verifiable rewards (GRPO, Dr. GRPO, DAPO, PPO), with TRL's metric names:
``group_advantages`` and ``varied_groups`` on ``[N]`` rewards of groups of completions,
``policy_loss`` (the clipped surrogate with an optional k3 KL penalty, aggregated by
``POLICY_LOSSES``), ``token_entropy``, and PPO's ``gae`` and ``value_loss``.
"""

from llmjax.losses.chunked import (
    DEFAULT_CHUNK,
    LogitStats,
    chunked_logit_stats,
    head_logit_stats,
    head_weight,
    plain_logit_stats,
)
from llmjax.losses.core import (
    SUMMED,
    cross_entropy_of_stats,
    masked_cross_entropy,
    next_token_loss,
    real_tokens,
    sequence_logprobs,
    target_logprobs,
    target_stats,
)
from llmjax.losses.distill import (
    DISTILL_KINDS,
    TOP_K_RESTS,
    distill_loss,
    distill_loss_top_k,
    teacher_log_normalizer,
    teacher_top_k,
)
from llmjax.losses.preference import (
    ORPO_MAX_LOGP,
    PREFERENCE_LOSSES,
    orpo_loss,
    preference_loss,
    reward_model_loss,
    simpo_loss,
)
from llmjax.losses.rl import (
    ADVANTAGE_SCALES,
    POLICY_LOSSES,
    gae,
    group_advantages,
    policy_loss,
    token_entropy,
    value_loss,
    varied_groups,
)

__all__ = [
    "ADVANTAGE_SCALES",
    "DEFAULT_CHUNK",
    "DISTILL_KINDS",
    "LogitStats",
    "ORPO_MAX_LOGP",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "SUMMED",
    "TOP_K_RESTS",
    "chunked_logit_stats",
    "cross_entropy_of_stats",
    "distill_loss",
    "distill_loss_top_k",
    "gae",
    "group_advantages",
    "head_logit_stats",
    "head_weight",
    "masked_cross_entropy",
    "next_token_loss",
    "orpo_loss",
    "plain_logit_stats",
    "policy_loss",
    "preference_loss",
    "real_tokens",
    "reward_model_loss",
    "sequence_logprobs",
    "simpo_loss",
    "target_logprobs",
    "target_stats",
    "teacher_log_normalizer",
    "teacher_top_k",
    "token_entropy",
    "value_loss",
    "varied_groups",
]
