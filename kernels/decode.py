"""``decode_attention``: a few new queries against a KV cache, with per-sequence lengths.

The G query heads that share a kv head, times the T new tokens, are folded into the rows of one
tile (``[B, K, T*G, C]``), so each cache block is read once per kv head rather than once per query
head, and the row count is large enough for the matrix units even at T = 1. Decode is bound by
reading the cache, so the GPU kernel also splits the cache length across programs ("split-K") to
occupy every SM when B*K is small; partial results are merged by their log-sum-exp.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels import common, reference
from kernels.flash import choose_implementation

log = logging.getLogger(__name__)


def _rows_to_slots(spec_rows, lengths_b, t, g):
    """Cache slot of each folded row (row r is token r // g)."""
    r = jax.lax.broadcasted_iota(jnp.int32, (spec_rows, 1), 0)
    return lengths_b - t + jax.lax.div(r, jnp.int32(g))


def zero_past_length(v, k0, length):
    """Slots past ``length`` may hold anything (even NaN): 0 * NaN would leak through P @ V."""
    rows = k0 + jax.lax.broadcasted_iota(jnp.int32, (v.shape[0], 1), 0)
    return jnp.where(rows < length, v, jnp.zeros_like(v))


def kv_range(lengths_b, t, window, bk):
    """Cache blocks [lo, hi) that hold a slot visible to any of the T new queries."""
    hi = common.floor_div(lengths_b + bk - 1, bk)
    lo = 0
    if window is not None:
        lo = jnp.maximum(0, common.floor_div(lengths_b - t - window + 1, bk))
    return jnp.minimum(lo, hi), hi


def _split_kernel(lens_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, spec, t, g, bk, n_split):
    b, si = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]
    q = q_ref[...]
    rows = q.shape[0]
    q_pos = _rows_to_slots(rows, length, t, g)
    lo, hi = kv_range(length, t, spec.window, bk)
    per = common.floor_div(hi - lo + n_split - 1, n_split)
    start = lo + si * per
    stop = jnp.minimum(hi, start + per)
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(j, carry):
        k0 = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k0, bk), :]
        v = v_ref[pl.ds(k0, bk), :]
        k_pos = k0 + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = common.visible(spec, q_pos, k_pos) & (k_pos < length)
        v = zero_past_length(v, k0, length)
        return common.online_softmax_step(spec, carry, q, k, v, mask, precision)

    carry = (
        jnp.full((rows, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    out, lse = common.finish_softmax(*jax.lax.fori_loop(start, stop, body, carry))
    o_ref[...] = out
    lse_ref[...] = lse


def _merge_splits(o_BKNRC, lse_BKNR1):
    """Combine per-split normalised outputs by their log-sum-exps (empty splits have -inf)."""
    top = jnp.max(lse_BKNR1, axis=2, keepdims=True)
    w = jnp.where(
        jnp.isneginf(lse_BKNR1), 0.0, jnp.exp(lse_BKNR1 - jnp.where(jnp.isneginf(top), 0.0, top))
    )
    total = jnp.sum(w, axis=2)
    return jnp.sum(w * o_BKNRC, axis=2) / jnp.where(total == 0.0, 1.0, total)


def _decode_triton(q_BKRC, k, v, lengths, spec, t, g, bk, n_split, interpret):
    b, kv_heads, rows, c = q_BKRC.shape
    s = k.shape[2]
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    part = (b, kv_heads, n_split, rows)
    o, lse = pl.pallas_call(
        functools.partial(_split_kernel, spec=spec, t=t, g=g, bk=bk, n_split=n_split),
        grid=(b, kv_heads, n_split),
        in_specs=[
            pl.BlockSpec((b,), lambda bi, ki, si: (0,)),
            pl.BlockSpec((None, None, rows, c), lambda bi, ki, si: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, s, c), lambda bi, ki, si: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, s, c), lambda bi, ki, si: (bi, ki, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, c), lambda bi, ki, si: (bi, ki, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda bi, ki, si: (bi, ki, si, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, c), jnp.float32),
            jax.ShapeDtypeStruct((*part, 1), jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="decode_attention",
    )(lengths, q_BKRC, k, v)
    return _merge_splits(o, lse)


def decode_attention(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    sliding_window=None,
    logit_soft_cap=None,
    scale=None,
    implementation=None,
    interpret=False,
    block_k=None,
    num_splits=None,
):
    """Attention of T new tokens (already written into the cache) over the cache.

    Args:
      q: ``[B, T, H, C]``; T is small (1 to a few tokens).
      k_cache, v_cache: ``[B, K, S, C]`` (heads-major, so that each kv head's slots are
        contiguous for the kernel and for XLA's batched matmuls) with K dividing H.
      lengths: int32 ``[B]``, valid slots per sequence including the T new tokens. Query t of
        sequence b sits at slot ``lengths[b] - T + t`` and sees slots ``j <= slot`` (and
        ``slot - j < sliding_window``); slots ``>= lengths[b]`` are never visible.
      logit_soft_cap, scale: as in ``flash_attention``.
      implementation: None or "pallas" (by platform), "xla", "pallas_triton",
        "pallas_mosaic_tpu".
      interpret: run the Pallas kernel in interpret mode (CPU).
      block_k, num_splits: tiling overrides (cache block length; GPU split-K count).

    Returns:
      ``[B, T, H, C]`` in q's dtype; a query with no visible slot (length < T) gives 0.
    """
    b, t, h, c = q.shape
    kv_heads, s = k_cache.shape[1], k_cache.shape[2]
    if (
        k_cache.shape != v_cache.shape
        or k_cache.shape[0] != b
        or h % kv_heads
        or k_cache.shape[3] != c
    ):
        raise ValueError(f"expected q [B,T,H,C], caches [B,K,S,C]; got {q.shape}, {k_cache.shape}")
    lengths = jnp.asarray(lengths, jnp.int32)
    impl = choose_implementation(implementation, interpret, c, q.dtype, op="decode_attention")
    if implementation in (None, "pallas") and impl == "pallas_triton" and not interpret:
        # Not yet validated on GPU hardware (docs/kernels.md); XLA reads the cache once as well.
        log.warning("decode_attention: the GPU kernel is not validated on hardware; using XLA")
        impl = "xla"
    if impl == "xla":
        return reference.decode_reference(
            q, k_cache, v_cache, lengths, sliding_window=sliding_window,
            logit_soft_cap=logit_soft_cap, scale=scale,
        )  # fmt: skip
    g = h // kv_heads
    spec = common.MaskSpec(
        causal=True,
        window=None if sliding_window is None else int(sliding_window),
        offset=0,
        kv_len=s,
        segments=False,
        soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
        scale=float(c**-0.5 if scale is None else scale),
    )
    tpu = impl == "pallas_mosaic_tpu"
    min_rows = 8 if tpu else 16
    rows = max(min_rows, 1 << max(0, (t * g - 1).bit_length()))
    bk = block_k or (512 if tpu else 64)
    bk = max(128 if tpu else 16, min(bk, 1 << max(0, (s - 1).bit_length())))
    s_pad = -(-s // bk) * bk
    pad_s = [(0, 0), (0, 0), (0, s_pad - s), (0, 0)]
    k_cache, v_cache = jnp.pad(k_cache, pad_s), jnp.pad(v_cache, pad_s)
    # [B, T, K, G, C] -> [B, K, T*G, C]: row r is token r // G of head (k, r % G).
    q_BKRC = q.reshape(b, t, kv_heads, g, c).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, c)
    q_BKRC = jnp.pad(q_BKRC, [(0, 0), (0, 0), (0, rows - t * g), (0, 0)])
    if tpu:
        from kernels import decode_tpu

        out = decode_tpu.decode(q_BKRC, k_cache, v_cache, lengths, spec, t, g, bk, interpret)
    else:
        if num_splits is None:  # enough programs to cover ~2 waves of a large GPU
            num_splits = max(1, min(s_pad // bk, 256 // max(1, b * kv_heads)))
        out = _decode_triton(
            q_BKRC, k_cache, v_cache, lengths, spec, t, g, bk, num_splits, interpret
        )
    out = out[:, :, : t * g].reshape(b, kv_heads, t, g, c).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, c).astype(q.dtype)
