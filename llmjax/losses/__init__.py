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

from llmjax.losses.core import (
    SUMMED,
    masked_cross_entropy,
    next_token_loss,
    real_tokens,
    sequence_logprobs,
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
    "DISTILL_KINDS",
    "ORPO_MAX_LOGP",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "SUMMED",
    "TOP_K_RESTS",
    "distill_loss",
    "distill_loss_top_k",
    "gae",
    "group_advantages",
    "masked_cross_entropy",
    "next_token_loss",
    "orpo_loss",
    "policy_loss",
    "preference_loss",
    "real_tokens",
    "reward_model_loss",
    "sequence_logprobs",
    "simpo_loss",
    "teacher_log_normalizer",
    "teacher_top_k",
    "token_entropy",
    "value_loss",
    "varied_groups",
]
