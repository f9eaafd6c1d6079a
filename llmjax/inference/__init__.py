"""Inference: batched sampling with a KV cache, speculative decoding, decoding helpers and
weight-only quantization; ``rollout`` samples inside a jitted function (a training step);
``RewardModel`` scores token sequences (best-of-N with ``best_of_n(..., reward_model=rm)``).

    from llmjax.inference import generate
    out = generate(model, params, [[1, 5, 7], [1, 9]], max_new_tokens=32, temperature=0.8, top_p=0.9)
    out.tokens, out.logprobs, out.lengths

See ``docs/inference.md``.
"""

from llmjax.inference.helpers import best_of_n, cot_decode, self_consistency
from llmjax.inference.processors import SamplingConfig
from llmjax.inference.quantize import QuantizedModel, dequantize, quantize
from llmjax.inference.reward import RewardModel, load_reward_model
from llmjax.inference.rollout import Rollout, continuation_batch, rollout
from llmjax.inference.sampler import GenerationResult, generate
from llmjax.inference.speculative import SpeculativeResult, speculative_generate

__all__ = [
    "GenerationResult",
    "QuantizedModel",
    "RewardModel",
    "Rollout",
    "SamplingConfig",
    "SpeculativeResult",
    "best_of_n",
    "continuation_batch",
    "cot_decode",
    "dequantize",
    "generate",
    "load_reward_model",
    "quantize",
    "rollout",
    "self_consistency",
    "speculative_generate",
]
