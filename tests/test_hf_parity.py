"""Logit parity with Hugging Face transformers for every family and config option (fp32, 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

import llmjax
from tests.hf_util import build_hf, hf_logits, random_tokens

TOL = 1e-4

VARIANTS = [
    # family, HF config overrides: each case exercises one option (GQA/MQA/MHA, ties, biases, ropes,
    # windows, soft-caps, activations).
    ("llama", {}),
    ("llama", {"num_key_value_heads": 1}),  # MQA
    ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),  # MHA, tied
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}}),
    (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            }
        },
    ),
    (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 4.0,
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    ("llama", {"hidden_act": "gelu", "head_dim": 8}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 3, "num_key_value_heads": 1}),
    ("mistral", {"head_dim": 32}),  # head_dim != hidden_size / heads
    ("qwen3", {}),
    ("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("qwen3", {"attention_bias": True}),
    (
        "qwen3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "factor": 2.0,
                "rope_theta": 1e6,
                "original_max_position_embeddings": 64,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            }
        },
    ),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    ("gemma2", {}),
    ("gemma2", {"attention_bias": True, "hidden_activation": "gelu"}),
    (
        "gemma2",
        {"attn_logit_softcapping": None, "final_logit_softcapping": 5.0, "num_key_value_heads": 1},
    ),
    ("gemma3", {}),
    (
        "gemma3",
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            }
        },
    ),
    ("gemma3", {"final_logit_softcapping": 10.0, "tie_word_embeddings": False}),
    ("gpt2", {}),
    ("gpt2", {"activation_function": "relu", "n_inner": 80}),
    ("gpt2", {"tie_word_embeddings": False}),
]


def _ids(v):
    fam, kw = v
    return fam + ("-" + "-".join(sorted(kw)) if kw else "")


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[_ids(v) for v in VARIANTS])
def test_logits_match_transformers(tmp_path, family, overrides):
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path)
    model, params = llmjax.from_hf(tmp_path)
    tokens = random_tokens(2, 13)  # 13 > every sliding window in the tests
    diff = np.abs(np.asarray(model.apply(params, tokens)) - hf_logits(hf, tokens)).max()
    assert diff <= TOL, f"max abs logit diff {diff}"


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_padded_batch_matches_transformers(tmp_path, family):
    """Left-padded prompts of different lengths: logits equal at every real token."""
    hf = build_hf(family)
    hf.save_pretrained(tmp_path)
    model, params = llmjax.from_hf(tmp_path)
    tokens = random_tokens(3, 11, seed=1)
    lengths = np.array([11, 7, 4])
    mask = (np.arange(11)[None, :] >= 11 - lengths[:, None]).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = hf_logits(hf, tokens, attention_mask=mask, position_ids=positions)
    out = np.asarray(model.apply(params, tokens, positions=positions, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= TOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = build_hf("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, params = llmjax.from_hf(tmp_path)
    tokens = random_tokens(1, 9)
    assert np.abs(np.asarray(model.apply(params, tokens)) - hf_logits(hf, tokens)).max() <= TOL
