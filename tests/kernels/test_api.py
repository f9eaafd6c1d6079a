"""The public surface: implementation choice, fallbacks, validation, and the reference itself."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import kernels
from tests.kernels import util


def _naive(q, k, v, causal, window, seg_q, seg_k, cap, scale):
    """Loop-by-loop numpy attention written from the mask definitions, to check the reference."""
    b, t, h, c = q.shape
    s, kv = k.shape[1], k.shape[2]
    out = np.zeros((b, t, h, c))
    for bi, i, hi in np.ndindex(b, t, h):
        pos_q = i + s - t
        keys = [
            j for j in range(s)
            if (not causal or j <= pos_q)
            and (window is None or pos_q - j < window)
            and (seg_q is None or seg_q[bi, i] == seg_k[bi, j])
        ]  # fmt: skip
        if not keys:
            continue
        kk = k[bi, keys, hi // (h // kv)].astype(np.float64)
        logits = kk @ q[bi, i, hi].astype(np.float64) * scale
        if cap is not None:
            logits = cap * np.tanh(logits / cap)
        p = np.exp(logits - logits.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, keys, hi // (h // kv)].astype(np.float64)
    return out


@pytest.mark.parametrize(
    ("t", "s", "causal", "window", "docs", "cap"),
    [
        (5, 9, True, None, 0, None),
        (9, 5, True, 3, 0, 2.0),
        (7, 7, False, 2, 3, None),
        (8, 8, True, None, 2, None),
    ],
)
def test_reference_matches_mask_definitions(t, s, causal, window, docs, cap):
    q, k, v, _ = util.inputs(t * 10 + s, 1, t, s, 4, 2, 8, jnp.float32)
    seg = util.packed_segments(1, 1, t, docs) if docs else None
    got = kernels.attention_reference(
        q, k, v, causal=causal, sliding_window=window, segment_ids=seg, logit_soft_cap=cap
    )
    seg_np = None if seg is None else np.asarray(seg)
    want = _naive(*map(np.asarray, (q, k, v)), causal, window, seg_np, seg_np, cap, 8**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_cpu_default_is_reference_and_kernel_needs_interpret():
    q, k, v, _ = util.inputs(0, 1, 16, 16, 2, 1, 64, jnp.float32)
    ref = kernels.attention_reference(q, k, v)
    np.testing.assert_array_equal(np.asarray(kernels.flash_attention(q, k, v)), np.asarray(ref))
    util.assert_close(kernels.flash_attention(q, k, v, interpret=True), ref, jnp.float32)


def test_unsupported_head_dim_falls_back_with_warning(caplog):
    q, k, v, _ = util.inputs(0, 1, 16, 16, 2, 1, 48, jnp.float32)
    with caplog.at_level(logging.WARNING, logger="llmjax.kernels.flash"):
        out = kernels.flash_attention(q, k, v, interpret=True)
    assert "head_dim 48" in caplog.text
    util.assert_close(out, kernels.attention_reference(q, k, v), jnp.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        kernels.flash_attention(q, k, v, implementation="pallas_triton", interpret=True)


def test_validation():
    q, k, v, _ = util.inputs(0, 1, 16, 12, 3, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="K does not divide H"):
        kernels.flash_attention(q, k, v)
    q, k, v, _ = util.inputs(0, 1, 16, 12, 4, 2, 64, jnp.float32)
    with pytest.raises(ValueError, match="T == S"):
        kernels.flash_attention(q, k, v, segment_ids=jnp.zeros((1, 16), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        kernels.flash_attention(q, k, v, implementation="cuda")
