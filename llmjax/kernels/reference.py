"""XLA references: plain jnp attention with exactly the kernels' mask semantics.

O(T * S) memory; used as the CPU default, the fallback for unsupported features, and the oracle in
tests. Axis letters follow ``llmjax.axes``: B batch, T queries, S keys, H query heads, K kv heads,
G = H // K query heads per kv head, C head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.kernels.common import MASK_VALUE


def _attend(q_BTHC, k_BSKC, v_BSKC, visible_BTS, scale, soft_cap):
    """Masked softmax attention in fp32; returns (out [B,T,H,C] fp32, lse [B,H,T] fp32)."""
    b, t, h, c = q_BTHC.shape
    kv_heads = k_BSKC.shape[2]
    q_BTKGC = q_BTHC.reshape(b, t, kv_heads, h // kv_heads, c).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    s_BKGTS = jnp.einsum("BTKGC,BSKC->BKGTS", q_BTKGC, k_BSKC.astype(jnp.float32), precision=hi)
    s_BKGTS = s_BKGTS * scale
    if soft_cap is not None:
        s_BKGTS = soft_cap * jnp.tanh(s_BKGTS / soft_cap)
    mask = visible_BTS[:, None, None]
    s_BKGTS = jnp.where(mask, s_BKGTS, MASK_VALUE)
    m = jax.lax.stop_gradient(jnp.max(s_BKGTS, axis=-1, keepdims=True))
    p_BKGTS = jnp.where(mask, jnp.exp(s_BKGTS - m), 0.0)
    l = jnp.sum(p_BKGTS, axis=-1, keepdims=True)
    empty = l == 0.0
    p_BKGTS = p_BKGTS / jnp.where(empty, 1.0, l)
    out_BTKGC = jnp.einsum("BKGTS,BSKC->BTKGC", p_BKGTS, v_BSKC.astype(jnp.float32), precision=hi)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out_BTKGC.reshape(b, t, h, c), lse[..., 0].reshape(b, h, t)


def _window_ok(q_pos, k_pos, causal, sliding_window):
    ok = jnp.ones(jnp.broadcast_shapes(q_pos.shape, k_pos.shape), bool)
    if causal:
        ok = ok & (k_pos <= q_pos)
    if sliding_window is not None:
        ok = ok & (q_pos - k_pos < sliding_window)
    return ok


def attention_reference(
    q,
    k,
    v,
    *,
    causal=True,
    sliding_window=None,
    segment_ids=None,
    logit_soft_cap=None,
    scale=None,
    return_lse=False,
):
    """Reference for ``kernels.flash_attention`` (same arguments and mask semantics)."""
    b, t, _, c = q.shape
    s = k.shape[1]
    scale = c**-0.5 if scale is None else scale
    q_pos = (jnp.arange(t) + (s - t))[None, :, None]
    k_pos = jnp.arange(s)[None, None, :]
    ok = _window_ok(q_pos, k_pos, causal, sliding_window)
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
        ok = ok & (q_seg[:, :, None] == kv_seg[:, None, :])
    ok = jnp.broadcast_to(ok, (b, t, s))
    out, lse = _attend(q, k, v, ok, scale, logit_soft_cap)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def decode_reference(
    q, k_cache, v_cache, lengths, *, sliding_window=None, logit_soft_cap=None, scale=None
):
    """Reference for ``kernels.decode_attention`` (caches ``[B, K, S, C]``): query t of row b sits
    at slot len_b - T + t."""
    _, t, _, c = q.shape
    s = k_cache.shape[2]
    scale = c**-0.5 if scale is None else scale
    lengths = lengths.astype(jnp.int32)
    q_pos = (lengths[:, None] - t + jnp.arange(t)[None, :])[:, :, None]
    k_pos = jnp.arange(s)[None, None, :]
    filled = k_pos < lengths[:, None, None]  # [B, 1, S]
    ok = _window_ok(q_pos, k_pos, True, sliding_window) & filled
    # Slots past a length may hold anything, NaN included (a paged pool's other sequences): a
    # zero probability times NaN would still reach the output.
    v_cache = jnp.where(filled[..., None], v_cache, jnp.zeros((), v_cache.dtype))
    k_BSKC, v_BSKC = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)
    out, _ = _attend(q, k_BSKC, v_BSKC, ok, scale, logit_soft_cap)
    return out.astype(q.dtype)


def gather_pages(pages_KPNC, page_table_BM):
    """A paged pool ``[K, P, N, C]`` (N slots per page) as contiguous caches ``[B, K, M*N, C]``:
    slot ``i`` of sequence b is slot ``i % N`` of page ``page_table[b, i // N]``. Page ids are
    clipped into the pool, so table entries past a sequence's length may hold any value."""
    kv_heads, _, n, c = pages_KPNC.shape
    b, m = page_table_BM.shape
    pages_KBMNC = jnp.take(pages_KPNC, page_table_BM, axis=1, mode="clip")
    return jnp.moveaxis(pages_KBMNC, 0, 1).reshape(b, kv_heads, m * n, c)
