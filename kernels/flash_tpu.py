"""Flash attention forward and backward as Pallas Mosaic TPU kernels.

TPU kernels are pipelined by the grid: the reduction axis (key blocks for the forward and dQ,
query blocks and the G heads of a kv group for dK/dV) is the innermost, sequential ("arbitrary")
grid axis and the running statistics live in VMEM scratch between steps. Blocks that causality or
the window hide are skipped twice over: ``pl.when`` skips the compute, and the index maps clamp to
the nearest needed block, so the pipeline sees an unchanged block index and issues no DMA.

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

from kernels import common

_F32 = jnp.float32


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _ranges(spec, i, bq, bk, nk):
    return common.kv_block_range(spec, i * bq + spec.offset, i * bq + bq - 1 + spec.offset, bk, nk)


def _clamp(x, lo, hi):
    return jnp.clip(x, lo, jnp.maximum(hi - 1, lo))


def _mask(spec, i, j, bq, bk, qs_ref, ks_ref):
    q_pos = i * bq + spec.offset + jax.lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    if spec.segments:
        return common.visible(spec, q_pos, k_pos, qs_ref[...], ks_ref[...])
    return common.visible(spec, q_pos, k_pos)


def _when_visible(spec, i, j, bq, bk, nk, fn):
    """Run ``fn(masked)`` for a (query block i, key block j) pair unless it is fully hidden."""
    lo, full_lo, full_hi, hi = _ranges(spec, i, bq, bk, nk)
    full = (j >= full_lo) & (j < full_hi)
    pl.when(full)(lambda: fn(False))
    pl.when((j >= lo) & (j < hi) & jnp.logical_not(full))(lambda: fn(True))


def _seg_specs(spec, bq, bk, q_index, k_index):
    if not spec.segments:
        return []
    return [pl.BlockSpec((None, bq, 1), q_index), pl.BlockSpec((None, 1, bk), k_index)]


def _params(n_parallel, n_arbitrary):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * n_parallel + ("arbitrary",) * n_arbitrary
    )


# --- forward ----------------------------------------------------------------------------------


def _fwd_kernel(*refs, spec, bq, bk, nk):
    q_ref, k_ref, v_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    i, j = pl.program_id(2), pl.program_id(3)

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

    _when_visible(spec, i, j, bq, bk, nk, step)

    @pl.when(j == nk - 1)
    def _finish():
        out, lse = common.finish_softmax(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward(q, k, v, q_seg, kv_seg, *, spec, bq, bk, num_warps, num_stages, interpret):
    """Padded ``[B, T, H, C]`` inputs -> (out [B,T,H,C], lse [B,H,T,1] fp32)."""
    del num_warps, num_stages  # GPU-only knobs
    b, t, h, c = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = t // bq, s // bk
    q_BHTC, k_BKSC, v_BKSC = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))

    def kv_index(bi, hi, i, j):
        lo, _, _, hi_ = _ranges(spec, i, bq, bk, nk)
        return bi, jax.lax.div(hi, g), _clamp(j, lo, hi_), 0

    def kv_seg_index(bi, hi, i, j):
        lo, _, _, hi_ = _ranges(spec, i, bq, bk, nk)
        return bi, 0, _clamp(j, lo, hi_)

    row = pl.BlockSpec((None, None, bq, c), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv = pl.BlockSpec((None, None, bk, c), kv_index)
    in_specs = [row, kv, kv]
    in_specs += _seg_specs(spec, bq, bk, lambda bi, hi, i, j: (bi, i, 0), kv_seg_index)
    args = [q_BHTC, k_BKSC, v_BKSC] + ([q_seg, kv_seg] if spec.segments else [])
    out, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nk=nk),
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=[row, pl.BlockSpec((None, None, bq, 1), lambda bi, hi, i, j: (bi, hi, i, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q_BHTC.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, t, 1), _F32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), _F32),
            pltpu.VMEM((bq, 1), _F32),
            pltpu.VMEM((bq, c), _F32),
        ],
        compiler_params=_params(3, 1),
        interpret=interpret,
        name="flash_fwd_tpu",
    )(*args)
    return jnp.swapaxes(out, 1, 2), lse


# --- backward ---------------------------------------------------------------------------------


def _dq_kernel(*refs, spec, bq, bk, nk):
    q_ref, k_ref, v_ref, do_ref, stats_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    dq_ref, dq_scr = rest
    i, j = pl.program_id(2), pl.program_id(3)

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

    _when_visible(spec, i, j, bq, bk, nk, step)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, spec, bq, bk, nk, nq, g):
    q_ref, k_ref, v_ref, do_ref, stats_ref, *rest = refs
    qs_ref, ks_ref = (rest.pop(0), rest.pop(0)) if spec.segments else (None, None)
    dk_ref, dv_ref, dk_scr, dv_scr = rest
    j, gi, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

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

    _when_visible(spec, i, j, bq, bk, nk, step)

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

    # dQ: grid (B, H, query block, key block), keys innermost.
    def kv_index(bi, hi, i, j):
        lo, _, _, hi_ = _ranges(spec, i, bq, bk, nk)
        return bi, jax.lax.div(hi, g), _clamp(j, lo, hi_), 0

    def kv_seg_index(bi, hi, i, j):
        lo, _, _, hi_ = _ranges(spec, i, bq, bk, nk)
        return bi, 0, _clamp(j, lo, hi_)

    row = pl.BlockSpec((None, None, bq, c), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv = pl.BlockSpec((None, None, bk, c), kv_index)
    st = pl.BlockSpec((None, None, 2, bq, 1), lambda bi, hi, i, j: (bi, hi, 0, i, 0))
    dq_specs = [row, kv, kv, row, st]
    dq_specs += _seg_specs(spec, bq, bk, lambda bi, hi, i, j: (bi, i, 0), kv_seg_index)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nk=nk),
        grid=(b, h, nq, nk),
        in_specs=dq_specs,
        out_specs=row,
        out_shape=jax.ShapeDtypeStruct(q_BHTC.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, c), _F32)],
        compiler_params=_params(3, 1),
        interpret=interpret,
        name="flash_bwd_dq_tpu",
    )(q_BHTC, k_BKSC, v_BKSC, do_BHTC, stats, *seg_args)

    # dK/dV: grid (B, K, key block, head in group, query block); the last two are reductions.
    def q_range(j):
        return common.q_block_range(spec, j * bk, j * bk + bk - 1, bq, nq)

    def q_index(bi, ki, j, gi, i):
        lo, hi_ = q_range(j)
        return bi, ki * g + gi, _clamp(i, lo, hi_), 0

    def st_index(bi, ki, j, gi, i):
        lo, hi_ = q_range(j)
        return bi, ki * g + gi, 0, _clamp(i, lo, hi_), 0

    def q_seg_index(bi, ki, j, gi, i):
        lo, hi_ = q_range(j)
        return bi, _clamp(i, lo, hi_), 0

    qb = pl.BlockSpec((None, None, bq, c), q_index)
    kb = pl.BlockSpec((None, None, bk, c), lambda bi, ki, j, gi, i: (bi, ki, j, 0))
    dkv_specs = [qb, kb, kb, qb, pl.BlockSpec((None, None, 2, bq, 1), st_index)]
    dkv_specs += _seg_specs(spec, bq, bk, q_seg_index, lambda bi, ki, j, gi, i: (bi, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nk=nk, nq=nq, g=g),
        grid=(b, kv_heads, nk, g, nq),
        in_specs=dkv_specs,
        out_specs=[kb, kb],
        out_shape=[jax.ShapeDtypeStruct(k_BKSC.shape, k.dtype)] * 2,
        scratch_shapes=[pltpu.VMEM((bk, c), _F32), pltpu.VMEM((bk, c), _F32)],
        compiler_params=_params(3, 2),
        interpret=interpret,
        name="flash_bwd_dkv_tpu",
    )(q_BHTC, k_BKSC, v_BKSC, do_BHTC, stats, *seg_args)
    return dq.swapaxes(1, 2), dk.swapaxes(1, 2), dv.swapaxes(1, 2)
