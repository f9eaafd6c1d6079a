"""``decode_attention``: a few new queries against a KV cache, with per-sequence lengths.

The G query heads that share a kv head, times the T new tokens, are folded into the rows of one
tile (``[B, K, T*G, C]``), so each cache block is read once per kv head rather than once per query
head, and the row count is large enough for the matrix units even at T = 1. Decode is bound by
reading the cache, so the GPU kernel also splits the cache length across programs ("split-K") to
occupy every SM when B*K is small; partial results are merged by their log-sum-exp.

With a page table the caches are pools of fixed-size pages shared by all sequences; the kernels
read each sequence's pages through its table row (the cache block is one page) and never gather.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llmjax.kernels import common, reference
from llmjax.kernels.flash import choose_implementation

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


def _split_kernel(lens_ref, *refs, spec, t, g, bk, n_split, pool_pages):
    """One (sequence, kv head, split) program. With ``pool_pages`` (a paged cache) the first ref
    is the sequence's page-table row and k/v refs are the head's whole pool ``[P, bk, C]``."""
    table_ref, refs = (refs[0], refs[1:]) if pool_pages else (None, refs)
    q_ref, k_ref, v_ref, o_ref, lse_ref = refs
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
        if pool_pages:
            page = jnp.clip(table_ref[j], 0, pool_pages - 1)
            k, v = k_ref[page], v_ref[page]
        else:
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


def _decode_triton(q_BKRC, k, v, lengths, page_table, spec, t, g, bk, n_split, interpret):
    """Caches ``[B, K, S, C]`` (S a multiple of ``bk``), or with ``page_table`` ``[B, M]`` pools
    ``[K, P, bk, C]``."""
    b, kv_heads, rows, c = q_BKRC.shape
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=4, num_stages=2)
    part = (b, kv_heads, n_split, rows)
    if page_table is None:
        pool_pages, tables = 0, []
        kv_spec = pl.BlockSpec((None, None, k.shape[2], c), lambda bi, ki, si: (bi, ki, 0, 0))
    else:
        pool_pages = k.shape[1]
        tables = [pl.BlockSpec((None, page_table.shape[1]), lambda bi, ki, si: (bi, 0))]
        kv_spec = pl.BlockSpec((None, pool_pages, bk, c), lambda bi, ki, si: (ki, 0, 0, 0))
    kernel = functools.partial(
        _split_kernel, spec=spec, t=t, g=g, bk=bk, n_split=n_split, pool_pages=pool_pages
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, n_split),
        in_specs=[
            pl.BlockSpec((b,), lambda bi, ki, si: (0,)),
            *tables,
            pl.BlockSpec((None, None, rows, c), lambda bi, ki, si: (bi, ki, 0, 0)),
            kv_spec,
            kv_spec,
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
    )(lengths, *([] if page_table is None else [page_table]), q_BKRC, k, v)
    return _merge_splits(o, lse)


def _check_shapes(q, k_cache, v_cache, page_table):
    """``(kv_heads, slots per sequence, page size or None)``, or a ValueError naming the layout."""
    b, _, h, c = q.shape
    if page_table is None:
        if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != c:
            raise ValueError(
                f"expected q [B,T,H,C] and caches [B,K,S,C]; got {q.shape}, {k_cache.shape}"
            )
        kv_heads, s, page = k_cache.shape[1], k_cache.shape[2], None
    else:
        if page_table.ndim != 2 or page_table.shape[0] != b:
            raise ValueError(f"page_table must be [B, pages per sequence]; got {page_table.shape}")
        if not jnp.issubdtype(page_table.dtype, jnp.integer):
            raise ValueError(f"page_table must hold integer page ids; got {page_table.dtype}")
        if k_cache.ndim != 4 or k_cache.shape[3] != c:
            raise ValueError(
                f"with a page_table the caches are pools [K, P, page_size, C]; got {k_cache.shape}"
            )
        kv_heads, page = k_cache.shape[0], k_cache.shape[2]
        s = page_table.shape[1] * page
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k and v caches differ: {k_cache.shape} vs {v_cache.shape}")
    if h % kv_heads:
        raise ValueError(f"{kv_heads} kv heads must divide the {h} query heads")
    return kv_heads, s, page


def _page_size_problem(impl, page, dtype):
    """Why ``impl`` cannot tile pages of ``page`` slots, or None."""
    if impl == "pallas_triton" and (page < 16 or page & (page - 1)):
        return f"page_size {page}: the GPU kernel needs a power of two >= 16 (its tile height)"
    sublanes = 8 * 4 // jnp.dtype(dtype).itemsize
    if impl == "pallas_mosaic_tpu" and page % sublanes:
        return (
            f"page_size {page}: the TPU kernel needs a multiple of {sublanes} for "
            f"{jnp.dtype(dtype).name} caches (a whole number of sublane tiles)"
        )
    return None


def decode_attention(
    q,
    k_cache,
    v_cache,
    lengths,
    *,
    page_table=None,
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
        contiguous for the kernel and for XLA's batched matmuls) with K dividing H. With a
        ``page_table`` they are page pools ``[K, P, N, C]`` shared by all sequences (N slots per
        page).
      lengths: int32 ``[B]``, valid slots per sequence including the T new tokens. Query t of
        sequence b sits at slot ``lengths[b] - T + t`` and sees slots ``j <= slot`` (and
        ``slot - j < sliding_window``); slots ``>= lengths[b]`` are never visible.
      page_table: int ``[B, M]`` or None: slot j of sequence b lives in slot ``j % N`` of pool
        page ``page_table[b, j // N]``, so a sequence holds up to ``M * N`` slots. Entries past
        a sequence's last page are never read and may hold any value (ids are clipped into the
        pool). Pages never need to be contiguous or in order.
      logit_soft_cap, scale: as in ``flash_attention``.
      implementation: None or "pallas" (by platform), "xla", "pallas_triton",
        "pallas_mosaic_tpu".
      interpret: run the Pallas kernel in interpret mode (CPU).
      block_k, num_splits: tiling overrides (cache block length, unpaged only; GPU split-K
        count).

    Returns:
      ``[B, T, H, C]`` in q's dtype; a query with no visible slot (length < T) gives 0.
    """
    b, t, h, c = q.shape
    if page_table is not None:
        page_table = jnp.asarray(page_table)
    kv_heads, s, page = _check_shapes(q, k_cache, v_cache, page_table)
    lengths = jnp.asarray(lengths, jnp.int32)
    impl = choose_implementation(implementation, interpret, c, q.dtype, op="decode_attention")
    if implementation in (None, "pallas") and impl == "pallas_triton" and not interpret:
        # Not yet validated on GPU hardware (docs/kernels.md); XLA reads the cache once as well.
        log.warning("decode_attention: the GPU kernel is not validated on hardware; using XLA")
        impl = "xla"
    if page_table is not None and (why := _page_size_problem(impl, page, k_cache.dtype)):
        if implementation not in (None, "pallas"):
            raise ValueError(f"decode_attention: {why}; implementation='xla' takes any size")
        log.warning("decode_attention: %s; using the XLA reference", why)
        impl = "xla"
    opts = dict(sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, scale=scale)
    if impl == "xla":
        if page_table is not None:
            k_cache, v_cache = (reference.gather_pages(x, page_table) for x in (k_cache, v_cache))
        return reference.decode_reference(q, k_cache, v_cache, lengths, **opts)
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
    if page_table is None:
        bk = block_k or (512 if tpu else 64)
        bk = max(128 if tpu else 16, min(bk, 1 << max(0, (s - 1).bit_length())))
        s_pad = -(-s // bk) * bk
        pad_s = [(0, 0), (0, 0), (0, s_pad - s), (0, 0)]
        k_cache, v_cache = jnp.pad(k_cache, pad_s), jnp.pad(v_cache, pad_s)
    else:
        page_table = page_table.astype(jnp.int32)
        bk, s_pad = page, s
    # [B, T, K, G, C] -> [B, K, T*G, C]: row r is token r // G of head (k, r % G).
    q_BKRC = q.reshape(b, t, kv_heads, g, c).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, t * g, c)
    q_BKRC = jnp.pad(q_BKRC, [(0, 0), (0, 0), (0, rows - t * g), (0, 0)])
    if tpu:
        from llmjax.kernels import decode_tpu

        out = decode_tpu.decode(
            q_BKRC, k_cache, v_cache, lengths, page_table, spec, t, g, bk, interpret
        )
    else:
        if num_splits is None:  # enough programs to cover ~2 waves of a large GPU
            num_splits = max(1, min(s_pad // bk, 256 // max(1, b * kv_heads)))
        out = _decode_triton(
            q_BKRC, k_cache, v_cache, lengths, page_table, spec, t, g, bk, num_splits, interpret
        )
    out = out[:, :, : t * g].reshape(b, kv_heads, t, g, c).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, h, c).astype(q.dtype)
