"""Flash attention forward and backward as Pallas Mosaic TPU kernels.

TPU kernels are pipelined by the grid: the reduction axis (key blocks for the forward and dQ,
query blocks and the G heads of a kv group for dK/dV) is the innermost, sequential ("arbitrary")
grid axis and the running statistics live in VMEM scratch between steps. Blocks that causality or
the window hide are skipped twice over: ``pl.when`` skips the compute, and the index maps clamp to
the nearest needed block, so the pipeline sees an unchanged block index and issues no DMA.
With segment ids the ranges narrow further to the blocks whose ids can match
(``common.segment_block_bounds``), so packed documents skip each other's blocks. Those bounds are
scalar-prefetched into SMEM, flat (two int32 per block, so SMEM pads nothing), where both the
index maps and the kernel bodies read them.

Layout: the wrapper moves heads before the sequence (``[B, H, T, C]``) so that every block's last
two dims are (rows, head_dim) tiles; statistics are ``[B, H, T, 1]``/``[B, H, 2, T, 1]`` and
segment ids ``[B, T, 1]`` / ``[B, 1, S]``, all with full-extent or 128-multiple trailing dims.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels import common

_F32 = jnp.float32


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _ranges(spec, bi, i, bq, bk, nq, nk, kv_bounds):
    """Key blocks of query block ``i`` (``common.kv_block_range``) within its segment bounds."""
    q_first = i * bq + spec.offset
    lo, full_lo, full_hi, hi = common.kv_block_range(spec, q_first, q_first + bq - 1, bk, nk)
    if kv_bounds is not None:  # with segment ids every block is masked: full_lo == full_hi == hi
        lo, hi = common.narrow(lo, hi, kv_bounds, (bi * nq + i) * 2)
        full_lo = full_hi = hi
    return lo, full_lo, full_hi, hi


def _q_range(spec, bi, j, bq, bk, nq, nk, q_bounds):
    """Query blocks that may see key block ``j``, within its segment bounds."""
    lo, hi = common.q_block_range(spec, j * bk, j * bk + bk - 1, bq, nq)
    if q_bounds is not None:
        lo, hi = common.narrow(lo, hi, q_bounds, (bi * nk + j) * 2)
    return lo, hi


def _segment_bounds(q_seg, kv_seg, bq, bk):
    """Flat ``kv_bounds [B * nq * 2]`` and ``q_bounds [B * nk * 2]`` for scalar prefetch."""
    kv_bounds, q_bounds = common.segment_block_bounds(q_seg[:, :, 0], kv_seg[:, 0, :], bq, bk)
    return kv_bounds.reshape(-1), q_bounds.reshape(-1)


def _clamp(x, lo, hi):
    return jnp.clip(x, lo, jnp.maximum(hi - 1, lo))


def _mask(spec, i, j, bq, bk, qs_ref, ks_ref):
    q_pos = i * bq + spec.offset + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    if spec.segments:
        return common.visible(spec, q_pos, k_pos, qs_ref[...], ks_ref[...])
    return common.visible(spec, q_pos, k_pos)


def _when_visible(ranges, j, fn, also=True):
    """Run ``fn(masked)`` for key block ``j`` of a query block with ``ranges`` unless hidden
    (or ``also`` is false)."""
    lo, full_lo, full_hi, hi = ranges
    full = (j >= full_lo) & (j < full_hi) & also
    pl.when(full)(lambda: fn(False))
    pl.when((j >= lo) & (j < hi) & also & jnp.logical_not(full))(lambda: fn(True))


def _seg_specs(spec, bq, bk, q_index, k_index):
    if not spec.segments:
        return []
    return [pl.BlockSpec((None, bq, 1), q_index), pl.BlockSpec((None, 1, bk), k_index)]


def _call(
    kernel, *, grid, bounds, in_specs, out_specs, out_shape, scratch, n_parallel, interpret, name
):
    """``pallas_call`` of the inputs, with the segment bounds (if any) scalar-prefetched first."""
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(bounds),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    dims = ("parallel",) * n_parallel + ("arbitrary",) * (len(grid) - n_parallel)
    call = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=dims),
        interpret=interpret,
        name=name,
    )
    return lambda *inputs: call(*bounds, *inputs)


# --- forward ----------------------------------------------------------------------------------


def _fwd_kernel(*refs, spec, bq, bk, nq, nk):
    kv_bounds, refs = (refs[0], refs[1:]) if spec.segments else (None, refs)
    q_ref, k_ref, v_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, _F32)
        l_scr[...] = jnp.zeros(l_scr.shape, _F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

    def step(masked):
        mask = _mask(spec, i, j, bq, bk, qs_ref, ks_ref) if masked else None
        carry = (m_scr[...], l_scr[...], acc_scr[...])
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        m, l, acc = common.online_softmax_step(spec, carry, q, k, v, mask, _precision(q.dtype))
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    _when_visible(_ranges(spec, bi, i, bq, bk, nq, nk, kv_bounds), j, step)

    @pl.when(j == nk - 1)
    def _finish():
        out, lse = common.finish_softmax(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _kv_specs(spec, bq, bk, c, g, nq, nk):
    """K, V (and key-segment) specs for a (B, H, query block, key block) grid: outside the query
    block's range the index clamps to the nearest needed block, so no DMA is issued."""

    def block(bi, hi, i, j, *bounds):
        lo, _, _, hi_ = _ranges(spec, bi, i, bq, bk, nq, nk, bounds[0] if bounds else None)
        return _clamp(j, lo, hi_)

    kv = pl.BlockSpec(
        (None, None, bk, c),
        lambda bi, hi, i, j, *r: (bi, jax.lax.div(hi, g), block(bi, hi, i, j, *r), 0),
    )
    seg = _seg_specs(
        spec,
        bq,
        bk,
        lambda bi, hi, i, j, *r: (bi, i, 0),
        lambda bi, hi, i, j, *r: (bi, 0, block(bi, hi, i, j, *r)),
    )
    return kv, seg


def forward(q, k, v, q_seg, kv_seg, *, spec, bq, bk, num_warps, num_stages, interpret):
    """Padded ``[B, T, H, C]`` inputs -> (out [B,T,H,C], lse [B,H,T,1] fp32)."""
    del num_warps, num_stages  # GPU-only knobs
    b, t, h, c = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    nq, nk = t // bq, s // bk
    q_BHTC, k_BKSC, v_BKSC = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    bounds = [_segment_bounds(q_seg, kv_seg, bq, bk)[0]] if spec.segments else []

    row = pl.BlockSpec((None, None, bq, c), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    kv, seg = _kv_specs(spec, bq, bk, c, h // kv_heads, nq, nk)
    lse_spec = pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    out, lse = _call(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk),
        grid=(b, h, nq, nk),
        bounds=bounds,
        in_specs=[row, kv, kv, *seg],
        out_specs=[row, lse_spec],
        out_shape=[
            jax.ShapeDtypeStruct(q_BHTC.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, t, 1), _F32),
        ],
        scratch=[pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, 1), _F32), pltpu.VMEM((bq, c), _F32)],
        n_parallel=3,
        interpret=interpret,
        name="flash_fwd_tpu",
    )(q_BHTC, k_BKSC, v_BKSC, *([q_seg, kv_seg] if spec.segments else []))
    return jnp.swapaxes(out, 1, 2), lse


# --- backward ---------------------------------------------------------------------------------


def _dq_kernel(*refs, spec, bq, bk, nq, nk):
    kv_bounds, refs = (refs[0], refs[1:]) if spec.segments else (None, refs)
    q_ref, k_ref, v_ref, do_ref, stats_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    dq_ref, dq_scr = rest
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, _F32)

    def step(masked):
        mask = _mask(spec, i, j, bq, bk, qs_ref, ks_ref) if masked else None
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        prec = _precision(q.dtype)
        ds, _ = common.backward_block(
            spec, q, k, v, do_ref[...], stats_ref[0], stats_ref[1], mask, prec
        )
        dq_scr[...] += jax.lax.dot_general(
            ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=_F32,
            precision=prec,
        )  # fmt: skip

    _when_visible(_ranges(spec, bi, i, bq, bk, nq, nk, kv_bounds), j, step)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec, bq, bk, nq, nk, g):
    (kv_bounds, q_bounds), refs = (refs[:2], refs[2:]) if spec.segments else ((None,) * 2, refs)
    q_ref, k_ref, v_ref, do_ref, stats_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    dk_ref, dv_ref, dk_scr, dv_scr = rest
    bi, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, _F32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, _F32)

    def step(masked):
        mask = _mask(spec, i, j, bq, bk, qs_ref, ks_ref) if masked else None
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        prec = _precision(q.dtype)
        ds, p = common.backward_block(spec, q, k, v, do, stats_ref[0], stats_ref[1], mask, prec)
        tn = (((0,), (0,)), ((), ()))  # contract the query rows: P^T dO and dS^T Q
        dv_scr[...] += jax.lax.dot_general(
            p.astype(do.dtype), do, tn, preferred_element_type=_F32, precision=prec
        )
        dk_scr[...] += jax.lax.dot_general(
            ds.astype(q.dtype), q, tn, preferred_element_type=_F32, precision=prec
        )

    # Both ranges are supersets of the visible pairs, so their intersection is too; the query
    # range is the one the index maps clamp to, so a block outside it was never loaded.
    q_lo, q_hi = _q_range(spec, bi, j, bq, bk, nq, nk, q_bounds)
    ranges = _ranges(spec, bi, i, bq, bk, nq, nk, kv_bounds)
    _when_visible(ranges, j, step, also=(i >= q_lo) & (i < q_hi))

    @pl.when((gi == g - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * spec.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, do, stats, *, spec, bq, bk, num_warps, num_stages, interpret):
    """Padded inputs, ``stats = [B, H, 2, T, 1]`` (lse with +inf for empty rows, delta)."""
    del num_warps, num_stages
    b, t, h, c = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = t // bq, s // bk
    q_BHTC, k_BKSC, v_BKSC, do_BHTC = (jnp.swapaxes(x, 1, 2) for x in (q, k, v, do))
    seg_args = [q_seg, kv_seg] if spec.segments else []
    kv_bounds, q_bounds = _segment_bounds(q_seg, kv_seg, bq, bk) if spec.segments else (None, None)

    # dQ: grid (B, H, query block, key block), keys innermost.
    row = pl.BlockSpec((None, None, bq, c), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    kv, seg = _kv_specs(spec, bq, bk, c, g, nq, nk)
    st = pl.BlockSpec((None, None, 2, bq, 1), lambda bi, hi, i, j, *_: (bi, hi, 0, i, 0))
    dq_bounds = [kv_bounds] if spec.segments else []
    dq = _call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk),
        grid=(b, h, nq, nk),
        bounds=dq_bounds,
        in_specs=[row, kv, kv, row, st, *seg],
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(q_BHTC.shape, q.dtype),
        scratch=[pltpu.VMEM((bq, c), _F32)],
        n_parallel=3,
        interpret=interpret,
        name="flash_bwd_dq_tpu",
    )(q_BHTC, k_BKSC, v_BKSC, do_BHTC, stats, *seg_args)

    # dK/dV: grid (B, K, key block, head in group, query block); the last two are reductions.
    def q_block(bi, j, i, bounds):
        lo, hi = _q_range(spec, bi, j, bq, bk, nq, nk, bounds[1] if bounds else None)
        return _clamp(i, lo, hi)

    def q_index(bi, ki, j, gi, i, *bounds):
        return bi, ki * g + gi, q_block(bi, j, i, bounds), 0

    def st_index(bi, ki, j, gi, i, *bounds):
        return bi, ki * g + gi, 0, q_block(bi, j, i, bounds), 0

    qb = pl.BlockSpec((None, None, bq, c), q_index)
    kb = pl.BlockSpec((None, None, bk, c), lambda bi, ki, j, gi, i, *_: (bi, ki, j, 0))
    dkv_seg = _seg_specs(
        spec, bq, bk,
        lambda bi, ki, j, gi, i, *r: (bi, q_block(bi, j, i, r), 0),
        lambda bi, ki, j, gi, i, *_: (bi, 0, j),
    )  # fmt: skip
    dkv_bounds = [kv_bounds, q_bounds] if spec.segments else []
    dk, dv = _call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=nq, nk=nk, g=g),
        grid=(b, kv_heads, nk, g, nq),
        bounds=dkv_bounds,
        in_specs=[qb, kb, kb, qb, pl.BlockSpec((None, None, 2, bq, 1), st_index), *dkv_seg],
        out_specs=[kb, kb],
        out_shape=[jax.ShapeDtypeStruct(k_BKSC.shape, k.dtype)] * 2,
        scratch=[pltpu.VMEM((bk, c), _F32), pltpu.VMEM((bk, c), _F32)],
        n_parallel=3,
        interpret=interpret,
        name="flash_bwd_dkv_tpu",
    )(q_BHTC, k_BKSC, v_BKSC, do_BHTC, stats, *seg_args)
    return dq.swapaxes(1, 2), dk.swapaxes(1, 2), dv.swapaxes(1, 2)
