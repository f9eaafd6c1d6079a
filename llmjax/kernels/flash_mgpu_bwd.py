"""Flash attention backward for Hopper GPUs in Pallas Mosaic GPU: a dQ kernel and a dK/dV kernel.

Both recompute P from the saved log-sum-exp and are warp-specialised like the forward
(``flash_mgpu``): a producer warpgroup streams blocks through a ring of shared-memory stages with
TMA, and two compute warpgroups run the products with wgmma.

- **dQ**: a program owns ``2 * ROWS`` query rows of one head (``ROWS`` per compute warpgroup) and
  streams the key/value blocks they see: ``S = Q K^T``, ``dP = dO V^T``, ``dS = P (dP - delta)``,
  ``dQ += dS K``.
- **dK/dV**: a program owns ``2 * KEYS`` keys of one kv head and streams, for each of the G query
  heads sharing it, the query blocks that see them (Q, dO, lse, delta): ``S^T = K Q^T``,
  ``dV += P^T dO``, ``dP^T = V dO^T``, ``dK += dS^T Q``. Working on the transposes keeps every
  product's A operand where wgmma wants it (registers or shared memory) and sums GQA groups in
  registers, without atomics.

Masking and block ranges follow ``common``: blocks no row can see are never loaded, interior blocks
skip the mask arithmetic, and a warpgroup passes over the program's blocks outside its own range
to keep barrier phases in step. Segment ids narrow the ranges as in the forward (other documents'
blocks are never loaded): the ids of a warpgroup's own rows (or keys) stay in registers, and each
stage carries the ids of the blocks it streams. The accumulators (dK and dV: 2 x 64 x C fp32 per
warpgroup) fit the register file for head dims 64 and 128; head dim 256 and fp32 use the Triton
backward.

Inputs arrive padded (T to ``2 * ROWS`` and the query block, S to ``2 * KEYS`` and the key block);
``lse2`` is the log-sum-exp in base 2 (+inf on rows that see nothing) and ``delta`` is
``rowsum(dO * O)`` minus lse's cotangent, both ``[B, H, T]`` fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from llmjax.kernels import common
from llmjax.kernels.flash_mgpu import (
    COMPUTE_REGS,
    COMPUTE_WGS,
    LOG2E,
    PRODUCER_REGS,
    ROWS,
    _transposed,
    _wg_range,
    block_ids,
    clip_range,
    load_ids,
    positions,
    run_blocks,
    smem_transforms,
    split_refs,
    stream_kv,
    tile_ranges,
)

KEYS = 64  # keys per compute warpgroup in the dK/dV kernel: the wgmma M tile


def supported(head_dim: int, dtype) -> str | None:
    """Why this backward cannot run these inputs, or None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the Mosaic GPU backward is bf16/fp16 only)"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} (dK and dV accumulators fit registers for 64 and 128)"
    return None


def block_sizes(head_dim: int) -> tuple[int, int]:
    """(key block of the dQ kernel, query block of the dK/dV kernel)."""
    return {64: (128, 64), 128: (64, 64)}[head_dim]


def _product_t(a_smem, b_smem):
    """``A B^T`` of two shared-memory tiles by wgmma, into a fresh fp32 accumulator read back
    into registers."""

    def run(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, _transposed(b_smem))
        return acc_ref[...]

    return pl.run_scoped(run, plgpu.ACC((a_smem.shape[0], b_smem.shape[0]), jnp.float32))


def _probabilities(spec, s, lse2):
    """P (or P^T) from raw logits and the base-2 lse broadcast to s's shape; also tanh or None."""
    if spec.soft_cap is None:
        return jnp.exp2(s * (spec.scale * LOG2E) - lse2), None
    t = jnp.tanh(s * (spec.scale / spec.soft_cap))
    return jnp.exp2(t * (spec.soft_cap * LOG2E) - lse2), t


def _dscores(p, dp, delta, t):
    ds = p * (dp - delta)
    return ds if t is None else ds * (1.0 - t * t)


# --- dQ ---------------------------------------------------------------------------------------


def _dq_kernel(*refs, spec, bk, nk, stages, groups):
    ins, (qs_ref, ks_ref, bounds_ref), (dq_ref, scoped) = split_refs(refs, 6, spec.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    (q2, do2, lse2_smem, delta2, k_smem, v_smem), ready, consumed, seg = scoped
    q_ready, do_ready, lse_ready, delta_ready, k_ready, v_ready = ready
    k_consumed, v_consumed = consumed
    (qs_smem2, ks_smem), (qs_ready, ks_ready) = seg or ((None, None), (None, None))
    b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    tile = lax.axis_index("q")
    t0 = tile * (COMPUTE_WGS * ROWS)
    wg_range, lo_p, hi_p = tile_ranges(
        spec, lambda w: _wg_range(spec, t0 + w * ROWS, bk, nk), bounds_ref, b, tile
    )

    def slot_of(j):
        return lax.rem(j - lo_p, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGS, action="increase")
        q_smem, do_smem = q2.at[wg], do2.at[wg]
        r0 = t0 + wg * ROWS
        rows = (b, pl.ds(r0, ROWS), h)
        stats = (b, h, pl.ds(r0, ROWS))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_ready.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse2_smem.at[wg], lse_ready.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta2.at[wg], delta_ready.at[wg])
        for barrier in (q_ready, do_ready, lse_ready, delta_ready):
            plgpu.barrier_wait(barrier.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        lse2 = plgpu.load(lse2_smem.at[wg], (), layout=row_layout)
        delta = plgpu.load(delta2.at[wg], (), layout=row_layout)
        if spec.segments:
            q_ids = load_ids(qs_ref.at[b, pl.ds(r0, ROWS)], qs_smem2.at[wg], qs_ready.at[wg],
                             row_layout)  # fmt: skip
        dq = plgpu.layout_cast(jnp.zeros((ROWS, q_smem.shape[-1]), jnp.float32), plgpu.Layout.WGMMA)

        def step(j, dq, masked):
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])

            s = _product_t(q_smem, k_smem.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

            dp = _product_t(do_smem, v_smem.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])
            p, t = _probabilities(spec, s, lax.broadcast_in_dim(lse2, s.shape, [0]))
            if masked:
                ids = None, None
                if spec.segments:
                    ids = block_ids(q_ids, ks_smem, ks_ready, slot, s.shape)
                ok = common.visible(spec, *positions(s.shape, r0 + spec.offset, j * bk), *ids)
                p = jnp.where(ok, p, 0.0)
            ds = _dscores(p, dp, lax.broadcast_in_dim(delta, s.shape, [0]), t)
            ds = ds.astype(q_smem.dtype)
            dq = pl.run_state(lambda acc: plgpu.wgmma(acc, ds, k_smem.at[slot]))(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_consumed.at[slot])
            return dq

        def pass_over(j, carry):
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])
            if spec.segments:
                plgpu.barrier_wait(ks_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            return carry

        rng = clip_range(wg_range(wg), lo_p, hi_p)
        dq = run_blocks(lo_p, *rng, hi_p, step, pass_over, dq)
        q_smem[...] = (dq * spec.scale).astype(q_smem.dtype)  # Q is no longer needed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == COMPUTE_WGS)(
        lambda: stream_kv(
            (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem), (k_ready, v_ready, ks_ready),
            consumed, b=b, kv_head=lax.div(h, jnp.int32(groups)), lo=lo_p, hi=hi_p, bk=bk,
            stages=stages,
        )
    )  # fmt: skip


# --- dK, dV -----------------------------------------------------------------------------------


def _q_range(spec, k_first, bq, nq):
    """``(lo, full_lo, full_hi, hi)`` of the query blocks that see keys [k_first, k_first + KEYS):
    blocks in [full_lo, full_hi) see every one of them and need no mask."""
    k_last = k_first + KEYS - 1
    lo, hi = common.q_block_range(spec, k_first, k_last, bq, nq)
    full_lo, full_hi = lo, hi
    if spec.causal:  # every row at or after the last key: row * bq + offset >= k_last
        full_lo = -common.floor_div(spec.offset - k_last, bq)
    if spec.window is not None:  # the block's last row within the window of the first key
        full_hi = common.floor_div(spec.window + k_first - spec.offset, bq)
    full_lo = jnp.where(k_last < spec.kv_len, full_lo, hi)  # padding keys need the mask
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _dkv_kernel(*refs, spec, bq, nq, stages, groups):
    ins, (qs_ref, ks_ref, bounds_ref), (dk_ref, dv_ref, scoped) = split_refs(refs, 6, spec.segments)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    (k2, v2, q_smem, do_smem, lse2_smem, delta_smem), ready, consumed, seg = scoped
    k_ready, v_ready, q_ready, do_ready, lse_ready, delta_ready = ready
    (ks_smem2, qs_smem), (ks_ready, qs_ready) = seg or ((None, None), (None, None))
    b, kv_head, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    tile = lax.axis_index("k")
    k0 = tile * (COMPUTE_WGS * KEYS)
    wg_range, lo_p, hi_p = tile_ranges(
        spec, lambda w: _q_range(spec, k0 + w * KEYS, bq, nq), bounds_ref, b, tile
    )
    n_p = hi_p - lo_p  # query blocks per head in the program's range

    def slot_of(g, i):
        return lax.rem(g * n_p + i - lo_p, stages)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGS, action="increase")
        k_smem, v_smem = k2.at[wg], v2.at[wg]
        k_first = k0 + wg * KEYS
        keys = (b, pl.ds(k_first, KEYS), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_ready.at[wg])
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])
        zeros = jnp.zeros((KEYS, k_smem.shape[-1]), jnp.float32)
        dk = dv = plgpu.layout_cast(zeros, plgpu.Layout.WGMMA)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        if spec.segments:  # the keys are the rows of S^T
            k_ids = load_ids(ks_ref.at[b, pl.ds(k_first, KEYS)], ks_smem2.at[wg], ks_ready.at[wg],
                             plgpu.Layout.WGMMA.reduce(1))  # fmt: skip

        def step(i, carry, masked, g):
            dk, dv = carry
            slot = slot_of(g, i)
            plgpu.barrier_wait(q_ready.at[slot])

            s_t = _product_t(k_smem, q_smem.at[slot])
            plgpu.barrier_wait(lse_ready.at[slot])
            lse2 = plgpu.load(lse2_smem.at[slot], (), layout=col_layout)
            p_t, t = _probabilities(spec, s_t, lax.broadcast_in_dim(lse2, s_t.shape, [1]))
            if masked:
                ids = None, None
                if spec.segments:  # S^T: keys are the rows, queries the columns
                    ids = block_ids(k_ids, qs_smem, qs_ready, slot, s_t.shape)[::-1]
                keys, queries = positions(s_t.shape, k_first, i * bq + spec.offset)
                ok = common.visible(spec, queries, keys, *ids)
                p_t = jnp.where(ok, p_t, 0.0)
            plgpu.barrier_wait(do_ready.at[slot])
            p_lo = p_t.astype(q_smem.dtype)
            dv = pl.run_state(lambda acc: plgpu.wgmma(acc, p_lo, do_smem.at[slot]))(
                plgpu.ACC.init(dv)
            )

            dp_t = _product_t(v_smem, do_smem.at[slot])
            plgpu.barrier_wait(delta_ready.at[slot])
            delta = plgpu.load(delta_smem.at[slot], (), layout=col_layout)
            ds_t = _dscores(p_t, dp_t, lax.broadcast_in_dim(delta, s_t.shape, [1]), t)
            ds_t = ds_t.astype(q_smem.dtype)
            dk = pl.run_state(lambda acc: plgpu.wgmma(acc, ds_t, q_smem.at[slot]))(
                plgpu.ACC.init(dk)
            )
            plgpu.barrier_arrive(consumed.at[slot])
            return dk, dv

        def head(g, carry):
            def pass_over(i, c):
                slot = slot_of(g, i)
                for barrier in (q_ready, lse_ready, do_ready, delta_ready, qs_ready):
                    if barrier is not None:
                        plgpu.barrier_wait(barrier.at[slot])
                plgpu.barrier_arrive(consumed.at[slot])
                return c

            rng = clip_range(wg_range(wg), lo_p, hi_p)
            return run_blocks(lo_p, *rng, hi_p, functools.partial(step, g=g), pass_over, carry)

        dk, dv = lax.fori_loop(0, groups, head, (dk, dv))
        k_smem[...] = (dk * spec.scale).astype(k_smem.dtype)  # K and V are no longer needed
        v_smem[...] = dv.astype(v_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _produce():
        plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
        total = groups * n_p

        @pl.loop(0, total)
        def _load(n):
            g, i = lax.div(n, n_p), lo_p + lax.rem(n, n_p)
            slot = lax.rem(n, stages)
            h = kv_head * groups + g

            @pl.when(n >= stages)
            def _():
                plgpu.barrier_wait(consumed.at[slot])

            rows, stats = (b, pl.ds(i * bq, bq), h), (b, h, pl.ds(i * bq, bq))
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse2_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem.at[slot], delta_ready.at[slot])
            if spec.segments:
                ids = qs_ref.at[b, pl.ds(i * bq, bq)]
                plgpu.copy_gmem_to_smem(ids, qs_smem.at[slot], qs_ready.at[slot])

        @pl.loop(jnp.maximum(0, total - stages), total)
        def _drain(n):
            plgpu.barrier_wait(consumed.at[lax.rem(n, stages)])


# --- entry ------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("spec", "bk", "bq", "stages"))
def backward(q, k, v, do, lse2, delta, q_seg=None, kv_seg=None, *, spec, bk=None, bq=None,
             stages=2):  # fmt: skip
    """Padded ``[B, T, H, C]`` / ``[B, S, K, C]`` inputs and ``[B, H, T]`` stats -> dq, dk, dv.

    ``q_seg [B, T]`` and ``kv_seg [B, S]`` int32 segment ids when ``spec.segments``. ``bk``: keys
    per stage of the dQ kernel; ``bq``: queries per stage of the dK/dV kernel.
    """
    b, t, h, c = q.shape
    s, kv = k.shape[1], k.shape[2]
    bk_default, bq_default = block_sizes(c)
    bk, bq = bk or bk_default, bq or bq_default
    if t % (COMPUTE_WGS * ROWS) or t % bq or s % (COMPUTE_WGS * KEYS) or s % bk:
        raise ValueError(
            f"pad T to {COMPUTE_WGS * ROWS} and {bq}, S to {COMPUTE_WGS * KEYS} and {bk} "
            f"(got T={t}, S={s})"
        )
    dtype, groups = q.dtype, h // kv
    tf = smem_transforms(c, dtype)
    params = plgpu.CompilerParams(approx_math=True)
    barriers = functools.partial(plgpu.Barrier, num_barriers=COMPUTE_WGS)
    ring = functools.partial(plgpu.Barrier, num_barriers=stages)
    released = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
    args = (q, k, v, do, lse2, delta)
    dq_args = dkv_args = args
    dq_seg = dkv_seg = None
    if spec.segments:
        dq_bounds = common.segment_block_bounds(q_seg, kv_seg, ROWS, bk)[0]
        dkv_bounds = common.segment_block_bounds(q_seg, kv_seg, bq, KEYS)[1]
        dq_args, dkv_args = args + (q_seg, kv_seg, dq_bounds), args + (q_seg, kv_seg, dkv_bounds)
        ids = functools.partial(plgpu.SMEM, dtype=jnp.int32)
        dq_seg = ((ids((COMPUTE_WGS, ROWS)), ids((stages, bk))), (barriers(), ring()))
        dkv_seg = ((ids((COMPUTE_WGS, KEYS)), ids((stages, bq))), (barriers(), ring()))

    def dq_entry(*refs):
        pl.run_scoped(
            lambda *scoped: functools.partial(
                _dq_kernel, spec=spec, bk=bk, nk=s // bk, stages=stages, groups=groups
            )(*refs, scoped),
            (
                plgpu.SMEM((COMPUTE_WGS, ROWS, c), dtype, transforms=tf),
                plgpu.SMEM((COMPUTE_WGS, ROWS, c), dtype, transforms=tf),
                plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
                plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
                plgpu.SMEM((stages, bk, c), dtype, transforms=tf),
                plgpu.SMEM((stages, bk, c), dtype, transforms=tf),
            ),
            (barriers(),) * 4 + (ring(),) * 2,
            (released,) * 2,
            dq_seg,
            collective_axes="wg",
        )

    dq = plgpu.kernel(
        dq_entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(h, t // (COMPUTE_WGS * ROWS), b),
        grid_names=("h", "q", "b"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=params,
    )(*dq_args)

    def dkv_entry(*refs):
        pl.run_scoped(
            lambda *scoped: functools.partial(
                _dkv_kernel, spec=spec, bq=bq, nq=t // bq, stages=stages, groups=groups
            )(*refs, scoped),
            (
                plgpu.SMEM((COMPUTE_WGS, KEYS, c), dtype, transforms=tf),
                plgpu.SMEM((COMPUTE_WGS, KEYS, c), dtype, transforms=tf),
                plgpu.SMEM((stages, bq, c), dtype, transforms=tf),
                plgpu.SMEM((stages, bq, c), dtype, transforms=tf),
                plgpu.SMEM((stages, bq), jnp.float32),
                plgpu.SMEM((stages, bq), jnp.float32),
            ),
            (barriers(),) * 2 + (ring(),) * 4,
            released,
            dkv_seg,
            collective_axes="wg",
        )

    dk, dv = plgpu.kernel(
        dkv_entry,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype),) * 2,
        grid=(kv, s // (COMPUTE_WGS * KEYS), b),
        grid_names=("h", "k", "b"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=params,
    )(*dkv_args)
    return dq, dk, dv
