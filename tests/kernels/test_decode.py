"""Decode attention: kernels (interpret mode) vs the reference, and the reference vs flash."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax import kernels
from tests.kernels import util

F32, BF16 = jnp.float32, jnp.bfloat16


def _cache_inputs(seed, b, t, s, h, kv, c, dtype):
    """q ``[B, T, H, C]`` and heads-major caches ``[B, K, S, C]``."""
    q, k, v, _ = util.inputs(seed, b, t, s, h, kv, c, dtype)
    return q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _check(impl, dtype, b, t, s, h, kv, c, lengths, **opts):
    q, k, v = _cache_inputs(len(lengths) * 7 + t, b, t, s, h, kv, c, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    out = kernels.decode_attention(
        q,
        k,
        v,
        lengths,
        implementation=impl,
        interpret=True,
        block_k=32 if impl == "pallas_triton" else None,
        **opts,
    )
    ref = kernels.decode_reference(*(x.astype(F32) for x in (q, k, v)), lengths, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    util.assert_close(out, ref, dtype, f"decode {impl}")


@pytest.mark.parametrize(
    ("t", "group", "opts", "dtype"),
    [
        (1, (8, 2), {}, F32),
        (3, (4, 4), dict(sliding_window=20), F32),
        pytest.param(2, (8, 1), dict(logit_soft_cap=4.0), F32, marks=pytest.mark.slow),
        (1, (4, 1), dict(sliding_window=1), BF16),
        pytest.param(4, (8, 8), dict(scale=0.2), BF16, marks=pytest.mark.slow),
    ],
)
def test_triton_decode(t, group, opts, dtype):
    h, kv = group
    # One sequence shorter than T (some queries see nothing), one full, others ragged.
    _check("pallas_triton", dtype, 3, t, 80, h, kv, 64, [max(1, t - 1), 80, 37], **opts)


@pytest.mark.parametrize(
    ("t", "opts"), [(1, {}), (3, dict(sliding_window=150, logit_soft_cap=5.0))]
)
def test_tpu_decode(t, opts):
    _check("pallas_mosaic_tpu", F32, 3, t, 300, 8, 2, 128, [t, 129, 300], **opts)


def test_decode_reference_matches_flash_on_full_cache():
    """With every cache slot filled, decode is flash attention's bottom-right aligned causal."""
    b, t, s, h, kv, c = 2, 3, 40, 4, 2, 64
    q, k, v, _ = util.inputs(11, b, t, s, h, kv, c, F32)
    full = jnp.full((b,), s, jnp.int32)
    for window in (None, 6):
        dec = kernels.decode_reference(
            q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), full, sliding_window=window
        )
        fl = kernels.attention_reference(q, k, v, causal=True, sliding_window=window)
        util.assert_close(dec, fl, F32, "decode vs flash reference")


def test_decode_ignores_slots_past_length():
    """Garbage beyond ``lengths`` must not leak into the result."""
    b, t, s, h, kv, c = 2, 1, 64, 4, 1, 64
    q, k, v = _cache_inputs(12, b, t, s, h, kv, c, F32)
    lengths = jnp.asarray([10, 33], jnp.int32)
    out = kernels.decode_attention(
        q, k, v, lengths, implementation="pallas_triton", interpret=True, block_k=16
    )
    k2 = k.at[:, :, 40:].set(1e4)
    v2 = v.at[:, :, 40:].set(jnp.nan)
    out2 = kernels.decode_attention(
        q, k2, v2, lengths, implementation="pallas_triton", interpret=True, block_k=16
    )
    util.assert_close(out2, out, F32, "garbage past length")


def _check_paged(impl, dtype, b, t, m, page, h, kv, c, lengths, **opts):
    s = m * page
    q, k, v = _cache_inputs(len(lengths) * 5 + t, b, t, s, h, kv, c, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    # Slots past each length hold NaN, as a reused page may: they must stay invisible.
    filled = (jnp.arange(s)[None] < lengths[:, None])[:, None, :, None]
    k, v = (jnp.where(filled, x, jnp.nan).astype(dtype) for x in (k, v))
    k_pool, v_pool, table = util.paged_caches(b + t, k, v, lengths, page)
    out = kernels.decode_attention(
        q, k_pool, v_pool, lengths, page_table=table, implementation=impl, interpret=True, **opts
    )
    ref = kernels.decode_reference(*(x.astype(F32) for x in (q, k, v)), lengths, **opts)
    assert out.shape == q.shape and out.dtype == dtype
    util.assert_close(out, ref, dtype, f"paged decode {impl}")


@pytest.mark.parametrize(
    ("impl", "t", "opts", "dtype"),
    [
        ("xla", 2, dict(sliding_window=21), F32),
        ("pallas_triton", 1, {}, F32),
        ("pallas_triton", 3, dict(sliding_window=20, logit_soft_cap=4.0), BF16),
        ("pallas_mosaic_tpu", 1, dict(sliding_window=30), F32),
        ("pallas_mosaic_tpu", 2, {}, BF16),
    ],
)
def test_paged_decode(impl, t, opts, dtype):
    """Pages in shuffled pool order, ragged lengths (one shorter than T, one exactly full)."""
    c = 128 if impl == "pallas_mosaic_tpu" else 64
    _check_paged(impl, dtype, 3, t, 5, 16, 8, 2, c, [max(1, t - 1), 80, 37], **opts)


def test_reference_ignores_nan_past_length():
    b, t, s, h, kv, c = 2, 1, 32, 4, 2, 64
    q, k, v = _cache_inputs(13, b, t, s, h, kv, c, F32)
    lengths = jnp.asarray([5, 20], jnp.int32)
    clean = kernels.decode_reference(q, k, v, lengths)
    poisoned = kernels.decode_reference(
        q, k.at[:, :, 20:].set(jnp.nan), v.at[:, :, 20:].set(jnp.nan), lengths
    )
    np.testing.assert_array_equal(np.asarray(poisoned[1]), np.asarray(clean[1]))
    assert np.isfinite(np.asarray(poisoned)).all()


def test_paged_decode_rejects_bad_layouts():
    q = jnp.zeros((2, 1, 4, 64), F32)
    pool = jnp.zeros((2, 6, 16, 64), F32)
    table = jnp.zeros((2, 3), jnp.int32)
    lengths = jnp.asarray([3, 40], jnp.int32)
    with pytest.raises(ValueError, match=r"page_table must be \[B, pages per sequence\]"):
        kernels.decode_attention(q, pool, pool, lengths, page_table=table[:1])
    with pytest.raises(ValueError, match="integer page ids"):
        kernels.decode_attention(q, pool, pool, lengths, page_table=table.astype(F32))
    with pytest.raises(ValueError, match="pools"):
        kernels.decode_attention(q, pool[..., :32], pool[..., :32], lengths, page_table=table)
    with pytest.raises(ValueError, match="power of two >= 16"):
        kernels.decode_attention(
            q, pool[:, :, :12], pool[:, :, :12], lengths, page_table=table,
            implementation="pallas_triton", interpret=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of 16 for bfloat16 caches"):
        bf = pool[:, :, :8].astype(BF16)
        kernels.decode_attention(
            q.astype(BF16), bf, bf, lengths, page_table=table,
            implementation="pallas_mosaic_tpu", interpret=True,
        )  # fmt: skip


def test_paged_decode_falls_back_for_untileable_pages(caplog):
    """With ``implementation=None`` a page size the kernel cannot tile runs the reference."""
    q, k, v = _cache_inputs(14, 2, 1, 48, 4, 2, 64, F32)
    lengths = jnp.asarray([7, 48], jnp.int32)
    k_pool, v_pool, table = util.paged_caches(3, k, v, lengths, 12)
    out = kernels.decode_attention(q, k_pool, v_pool, lengths, page_table=table, interpret=True)
    assert "power of two >= 16" in caplog.text and "XLA reference" in caplog.text
    util.assert_close(out, kernels.decode_reference(q, k, v, lengths), F32, "fallback")
