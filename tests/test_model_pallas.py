"""The model with ``attention_impl="pallas"``: Pallas kernels (interpret mode on CPU) keep parity."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from tests.hf_util import build_hf, hf_logits, random_tokens


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3", "gemma2", "gemma3", "gpt2"])
def test_pallas_logits_match_transformers(tmp_path, family):
    hf = build_hf(family)
    hf.save_pretrained(tmp_path)
    model, params = llmjax.from_hf(tmp_path, attention_impl="pallas")
    tokens = random_tokens(2, 13)
    assert np.abs(np.asarray(model.apply(params, tokens)) - hf_logits(hf, tokens)).max() <= 1e-4


def test_pallas_training_and_decoding_match_xla():
    """Packed gradients through the flash kernel's backward, and cached decoding, equal XLA's."""
    ref = llmjax.build("gemma2-tiny")  # local + global layers, soft-capping, GQA
    pallas = llmjax.build(ref.config.replace(attention_impl="pallas"))
    params = ref.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 24), 0, ref.config.vocab_size)
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 24])

    def loss(m, p):
        return m.apply(p, x, segment_ids=seg).std()

    g_ref, g_pal = (
        jax.grad(lambda p: loss(ref, p))(params),
        jax.grad(lambda p: loss(pallas, p))(params),
    )
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_pal), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6)

    full = ref.apply(params, x)
    # The local layer's ring buffer is read by XLA; with ring=False the decode kernel reads its
    # full cache through the sliding window.
    for ring in (True, False):
        cache, outs, t = pallas.init_cache(2, 32, ring=ring), [], 0
        assert (cache.ring_len is not None) == ring
        for n in [6, 1, 2, 15]:
            logits, cache = pallas.apply(params, x[:, t : t + n], cache=cache)
            outs.append(logits)
            t += n
        np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)
