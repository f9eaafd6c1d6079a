from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax


@pytest.fixture(scope="session")
def llama():
    """A llama-style tiny model with larger weights than the default init, so its next-token
    distributions are far from uniform and the sampling tests have something to tell apart."""
    model = llmjax.build("llama3-tiny", init_std=0.3)
    return model, model.init(jax.random.key(0))


def step_logits(model, params, prompt, generated):
    """Full-forward (no cache) logits ``[N, V]`` that each generated token was drawn from."""
    seq = jnp.asarray([list(prompt) + list(generated)], jnp.int32)
    logits = model.apply(params, seq)[0]
    n = len(prompt)
    return np.array(logits[n - 1 : n - 1 + len(generated)])


def batch_step_logits(model, params, prompt, tokens):
    """``step_logits`` for many continuations of one prompt that all have the same length."""
    seq = np.concatenate([np.tile(np.asarray(prompt), (len(tokens), 1)), np.asarray(tokens)], 1)
    logits = model.apply(params, jnp.asarray(seq, jnp.int32))
    n = len(prompt)
    return np.array(logits[:, n - 1 : n - 1 + len(tokens[0])])
