"""Tiny random Hugging Face models built in the test (no download) and a logit comparison."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Small dims shared by every family; individual tests override what they exercise.
BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**BASE, "rms_norm_eps": 1e-5, **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**BASE, "sliding_window": 5, **kw}),
    "qwen3": lambda **kw: transformers.Qwen3Config(**{**BASE, **kw}),
    "gemma2": lambda **kw: transformers.Gemma2Config(
        **{**BASE, "sliding_window": 5, "query_pre_attn_scalar": 24, **kw}
    ),
    "gemma3": lambda **kw: transformers.Gemma3TextConfig(
        **{
            **BASE,
            "sliding_window": 5,
            "query_pre_attn_scalar": 24,
            "num_hidden_layers": 4,
            "layer_types": [
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
            ],
            **kw,
        }
    ),
    "mixtral": lambda **kw: transformers.MixtralConfig(
        **{**BASE, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}
    ),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(
        **{**BASE, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32, **kw}
    ),
    "qwen2_moe": lambda **kw: transformers.Qwen2MoeConfig(
        **{
            **BASE,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            **kw,
        }
    ),
    "gpt2": lambda **kw: transformers.GPT2Config(
        **{"vocab_size": 97, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 128, **kw}
    ),
}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


def build_hf(family: str, seed: int = 0, cls: str | None = None, **config):
    """A randomly initialised HF model in float32, eager attention, eval mode.

    ``cls`` names another transformers class of the family (default its causal LM).

    Weights are re-drawn with a larger std than HF's init (0.02) so that every block, norm scale and
    bias matters to the logits and a wrong mapping cannot hide behind near-zero weights.
    """
    torch.manual_seed(seed)
    cfg = CONFIGS[family](**config)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls or CLASSES[family])(cfg).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales and biases: away from their identity values
                p.copy_(
                    0.5 + 0.3 * torch.randn(p.shape, generator=gen)
                    if "norm" in name or "ln_" in name
                    else 0.1 * torch.randn(p.shape, generator=gen)
                )
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 / p.shape[-1] ** 0.5)
    return model


def hf_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens)), **kw).logits.float().numpy()


def random_tokens(batch, length, vocab=97, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)
