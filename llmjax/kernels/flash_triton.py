"""Flash attention forward and backward as Pallas kernels in the GPU (Triton) style.

Each program owns one block of rows and loops over the other sequence in-kernel: the forward and
dQ kernels own ``bq`` query rows of one head and stream key blocks; the dK/dV kernel owns ``bk``
keys of one kv head and streams the query blocks of all G query heads that share it, so GQA never
materialises repeated K/V and dK/dV need no atomics. The loop bounds come from
``kv_block_range``/``q_block_range``: blocks that causality or the window hide are never visited,
and interior blocks run without mask arithmetic. With segment ids the bounds are narrowed further
to the blocks whose ids can match (``common.segment_block_bounds``), so packed documents skip
each other's blocks.

Inputs arrive padded (T and S multiples of the blocks) in the caller's ``[B, T, H, C]`` layout;
row statistics are ``[B, H, T, 1]`` and segment ids ``[B, T, 1]`` / ``[B, 1, S]``. The same code
runs in interpret mode on CPU, which is how CI checks it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from llmjax.kernels import common


def _compiler_params(num_warps, num_stages, interpret):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _row_positions(spec, r0, n):
    return r0 + spec.offset + jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0)


def _col_positions(k0, n):
    return k0 + jax.lax.broadcasted_iota(jnp.int32, (1, n), 1)


def _split_refs(refs, segments, n_in):
    """(inputs, (q_seg, kv_seg, block bounds) refs or Nones, outputs)."""
    n = n_in + (3 if segments else 0)
    ins, outs = list(refs[:n]), refs[n:]
    seg = tuple(ins[n_in:]) if segments else (None, None, None)
    return ins[:n_in], seg, outs


def _segment_bounds(q_seg, kv_seg, bq, bk):
    """``common.segment_block_bounds`` of the kernels' ``[B, T, 1]`` / ``[B, 1, S]`` ids."""
    return common.segment_block_bounds(q_seg[:, :, 0], kv_seg[:, 0, :], bq, bk)


def _query_block_segment_specs(bq, s):
    """Ids and key-block bounds for programs that own query block i (forward and dQ)."""
    return [
        pl.BlockSpec((None, bq, 1), lambda i, bi, hi: (bi, i, 0)),
        pl.BlockSpec((None, 1, s), lambda i, bi, hi: (bi, 0, 0)),
        pl.BlockSpec((None, None, 2), lambda i, bi, hi: (bi, i, 0)),
    ]


def _kv_range(spec, i, bq, bk, nk, bounds_ref):
    """``common.kv_block_range`` of query block i, narrowed to its documents' key blocks."""
    lo, full_lo, full_hi, hi = common.kv_block_range(
        spec, i * bq + spec.offset, i * bq + bq - 1 + spec.offset, bk, nk
    )
    if spec.segments:  # every block is masked then: full_lo == full_hi == hi
        lo, hi = common.narrow(lo, hi, bounds_ref)
        full_lo = full_hi = hi
    return lo, full_lo, full_hi, hi


# --- forward ----------------------------------------------------------------------------------


def _fwd_kernel(*refs, spec, bq, bk, nk, precision):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref, bounds_ref), (o_ref, lse_ref) = _split_refs(
        refs, spec.segments, 3
    )
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = _row_positions(spec, i * bq, bq)
    q_seg = qs_ref[...] if spec.segments else None
    lo, full_lo, full_hi, hi = _kv_range(spec, i, bq, bk, nk, bounds_ref)

    def step(masked):
        def body(j, carry):
            k0 = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(k0, bk), :]
            v = v_ref[pl.ds(k0, bk), :]
            mask = None
            if masked:
                k_seg = ks_ref[:, pl.ds(k0, bk)] if spec.segments else None
                mask = common.visible(spec, q_pos, _col_positions(k0, bk), q_seg, k_seg)
            return common.online_softmax_step(spec, carry, q, k, v, mask, precision)

        return body

    c = q.shape[-1]
    carry = (
        jnp.full((bq, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, c), jnp.float32),
    )
    carry = jax.lax.fori_loop(lo, full_lo, step(True), carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, step(False), carry)
    carry = jax.lax.fori_loop(full_hi, hi, step(True), carry)
    out, lse = common.finish_softmax(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(q, k, v, q_seg, kv_seg, *, spec, bq, bk, num_warps, num_stages, interpret):
    """Padded inputs -> (out [B,T,H,C], lse [B,H,T,1] fp32)."""
    b, t, h, c = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = t // bq, s // bk
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    in_specs = [
        pl.BlockSpec((None, bq, None, c), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, s, None, c), lambda i, bi, hi: (bi, 0, jax.lax.div(hi, g), 0)),
        pl.BlockSpec((None, s, None, c), lambda i, bi, hi: (bi, 0, jax.lax.div(hi, g), 0)),
    ]
    args = [q, k, v]
    if spec.segments:
        in_specs += _query_block_segment_specs(bq, s)
        args += [q_seg, kv_seg, _segment_bounds(q_seg, kv_seg, bq, bk)[0]]
    kernel = functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nk=nk, precision=precision)
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, c), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda i, bi, hi: (bi, hi, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, t, 1), jnp.float32),
        ],
        compiler_params=_compiler_params(num_warps, num_stages, interpret),
        interpret=interpret,
        name="flash_fwd",
    )(*args)


# --- backward: dQ -----------------------------------------------------------------------------


def _dq_kernel(*refs, spec, bq, bk, nk, precision):
    (q_ref, k_ref, v_ref, do_ref, stats_ref), (qs_ref, ks_ref, bounds_ref), (dq_ref,) = _split_refs(
        refs, spec.segments, 5
    )
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = stats_ref[0], stats_ref[1]
    q_pos = _row_positions(spec, i * bq, bq)
    q_seg = qs_ref[...] if spec.segments else None
    lo, full_lo, full_hi, hi = _kv_range(spec, i, bq, bk, nk, bounds_ref)

    def step(masked):
        def body(j, dq):
            k0 = pl.multiple_of(j * bk, bk)
            k = k_ref[pl.ds(k0, bk), :]
            v = v_ref[pl.ds(k0, bk), :]
            mask = None
            if masked:
                k_seg = ks_ref[:, pl.ds(k0, bk)] if spec.segments else None
                mask = common.visible(spec, q_pos, _col_positions(k0, bk), q_seg, k_seg)
            ds, _ = common.backward_block(spec, q, k, v, do, lse, delta, mask, precision)
            return dq + jax.lax.dot_general(
                ds.astype(k.dtype),
                k,
                (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32,
                precision=precision,
            )

        return body

    dq = jnp.zeros(q.shape, jnp.float32)
    dq = jax.lax.fori_loop(lo, full_lo, step(True), dq)
    dq = jax.lax.fori_loop(full_lo, full_hi, step(False), dq)
    dq = jax.lax.fori_loop(full_hi, hi, step(True), dq)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


# --- backward: dK, dV -------------------------------------------------------------------------


def _dkv_kernel(*refs, spec, bq, bk, nq, g, precision):
    (q_ref, k_ref, v_ref, do_ref, stats_ref), (qs_ref, ks_ref, bounds_ref), (dk_ref, dv_ref) = (
        _split_refs(refs, spec.segments, 5)
    )
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k0 = j * bk
    k_pos = _col_positions(k0, bk)
    k_seg = ks_ref[...] if spec.segments else None
    lo, hi = common.q_block_range(spec, k0, k0 + bk - 1, bq, nq)
    if spec.segments:
        lo, hi = common.narrow(lo, hi, bounds_ref)

    def body(idx, carry):
        dk, dv = carry
        n = jnp.asarray(hi - lo, jnp.int32)  # lax.div/rem: jnp's floor division selects i1/i32
        gi, i = jax.lax.div(idx, n), lo + jax.lax.rem(idx, n)
        r0 = pl.multiple_of(i * bq, bq)
        q = q_ref[pl.ds(r0, bq), gi, :]
        do = do_ref[pl.ds(r0, bq), gi, :]
        lse = stats_ref[gi, 0, pl.ds(r0, bq), :]
        delta = stats_ref[gi, 1, pl.ds(r0, bq), :]
        q_seg = qs_ref[pl.ds(r0, bq), :] if spec.segments else None
        mask = common.visible(spec, _row_positions(spec, r0, bq), k_pos, q_seg, k_seg)
        ds, p = common.backward_block(spec, q, k, v, do, lse, delta, mask, precision)
        tn = (((0,), (0,)), ((), ()))  # contract the query rows: P^T dO and dS^T Q
        dv = dv + jax.lax.dot_general(
            p.astype(do.dtype), do, tn, preferred_element_type=jnp.float32, precision=precision
        )
        dk = dk + jax.lax.dot_general(
            ds.astype(q.dtype), q, tn, preferred_element_type=jnp.float32, precision=precision
        )
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, g * (hi - lo), body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, do, stats, *, spec, bq, bk, num_warps, num_stages, interpret):
    """Padded inputs, ``stats = [B, H, 2, T, 1]`` (lse with +inf for empty rows, delta)."""
    b, t, h, c = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk = t // bq, s // bk
    precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    params = _compiler_params(num_warps, num_stages, interpret)
    dq_seg_args = dkv_seg_args = []
    if spec.segments:
        kv_bounds, q_bounds = _segment_bounds(q_seg, kv_seg, bq, bk)
        dq_seg_args, dkv_seg_args = [q_seg, kv_seg, kv_bounds], [q_seg, kv_seg, q_bounds]

    kv_full = pl.BlockSpec((None, s, None, c), lambda i, bi, hi: (bi, 0, jax.lax.div(hi, g), 0))
    row_spec = pl.BlockSpec((None, bq, None, c), lambda i, bi, hi: (bi, i, hi, 0))
    dq_specs = [row_spec, kv_full, kv_full, row_spec]
    dq_specs.append(pl.BlockSpec((None, None, 2, bq, 1), lambda i, bi, hi: (bi, hi, 0, i, 0)))
    if spec.segments:
        dq_specs += _query_block_segment_specs(bq, s)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nk=nk, precision=precision),
        grid=(nq, b, h),
        in_specs=dq_specs,
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_bwd_dq",
    )(q, k, v, do, stats, *dq_seg_args)

    # One program per (key block, kv head): the G query heads sharing it are a contiguous slab.
    q_group = pl.BlockSpec((None, t, g, c), lambda j, bi, ki: (bi, 0, ki, 0))
    kv_block = pl.BlockSpec((None, bk, None, c), lambda j, bi, ki: (bi, j, ki, 0))
    dkv_specs = [q_group, kv_block, kv_block, q_group]
    dkv_specs.append(pl.BlockSpec((None, g, 2, t, 1), lambda j, bi, ki: (bi, ki, 0, 0, 0)))
    if spec.segments:
        dkv_specs += [
            pl.BlockSpec((None, t, 1), lambda j, bi, ki: (bi, 0, 0)),
            pl.BlockSpec((None, 1, bk), lambda j, bi, ki: (bi, 0, j)),
            pl.BlockSpec((None, None, 2), lambda j, bi, ki: (bi, j, 0)),
        ]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=nq, g=g, precision=precision),
        grid=(nk, b, kv_heads),
        in_specs=dkv_specs,
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_bwd_dkv",
    )(q, k, v, do, stats, *dkv_seg_args)
    return dq, dk, dv
