"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU: TMA-fed and warp-specialised.

One program owns ``2 * ROWS`` query rows of one head and runs three warpgroups. A producer
warpgroup streams the program's key/value blocks into a ring of shared-memory stages with the
bulk tensor copy engine (TMA), completing on per-stage barriers. Two compute warpgroups own
``ROWS`` rows each and run the online softmax over those blocks with warpgroup MMAs (wgmma):
``S = Q K^T`` from shared memory into registers, ``O += P V`` with P from registers. Each stage
is released back to the producer through a "consumed" barrier that both compute warpgroups
arrive at.

The two compute warpgroups take turns on the tensor cores: a shared schedule barrier, passed
twice per key block by each of them, and offset by one pass at the start, lets one warpgroup's
softmax (exp, max, sums on the ALUs) overlap the other's matmuls. That overlap is most of what
separates this kernel from the Triton-lowered one.

Masking follows ``common`` exactly. The two warpgroups see different key ranges (causality, the
window), so the producer loads the union and each warpgroup passes over the blocks outside its own
range without computing, keeping both the barrier phases and the schedule-barrier turns in step.
Inside its range a warpgroup runs interior blocks without mask arithmetic.

Segment ids (packed documents) narrow each warpgroup's key range to the blocks whose ids can
match (``common.segment_block_bounds`` per ``ROWS`` rows): blocks of other documents are never
loaded. A warpgroup's query ids sit in registers for the whole program; each stage carries its
keys' ids beside K, and every block in range is masked.

Supported: bf16/fp16, head dims 64, 128 and 256, causal, sliding window, segment ids, soft cap,
GQA, T != S. fp32 runs the Triton kernel instead (``flash.py``).
Inputs arrive padded (T to ``2 * ROWS``, S to the key block) in ``[B, T, H, C]``; lse comes back
as ``[B, H, T]`` fp32 in natural log.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from llmjax.kernels import common

ROWS = 64  # query rows per compute warpgroup: the wgmma M tile
COMPUTE_WGS = 2
# Registers per thread after the warpgroups rebalance (setmaxnreg). The producer gives back what
# the compute warpgroups take; the total must fit the 64K-register file of one program's three
# warpgroups, or ``setmaxnreg.inc`` waits forever for registers that never come.
COMPUTE_REGS, PRODUCER_REGS = 232, 40
assert (COMPUTE_WGS * COMPUTE_REGS + PRODUCER_REGS) * 128 <= 65536
LOG2E = math.log2(math.e)
# Masked logits in the exp2 domain; finite so that a row with nothing visible yet never
# computes inf - inf (its probabilities are zeroed explicitly instead).
MASK = -1e30


def block_kv(head_dim: int) -> int:
    """Keys per stage, measured on H100 (``bench/attention.py --tune-mosaic``); two stages of K
    and V plus Q must fit in 227 KiB of shared memory, which caps head dim 256 at 64 keys."""
    return {64: 256, 128: 128}.get(head_dim, 64)


def supported(head_dim: int, dtype) -> str | None:
    """Why this kernel cannot run these inputs, or None."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype)} (the Mosaic GPU kernel is bf16/fp16 only)"
    if head_dim not in (64, 128, 256):
        return f"head_dim {head_dim} (the Mosaic GPU kernel supports 64, 128, 256)"
    return None


def _transposed(ref):
    # jax >= 0.11 transposes refs with a method; earlier releases with ``plgpu.transpose_ref``.
    if jax.__version_info__ >= (0, 11):
        return ref.transpose((1, 0))
    return plgpu.transpose_ref(ref, (1, 0))


def _wg_range(spec, r0, bk, nk):
    """``common.kv_block_range`` for the warpgroup's rows [r0, r0 + ROWS)."""
    return common.kv_block_range(spec, r0 + spec.offset, r0 + ROWS - 1 + spec.offset, bk, nk)


def narrowed(rng, bounds_ref, b, i):
    """A block range ``(lo, full_lo, full_hi, hi)`` cut to the blocks that segment ids leave
    visible, ``bounds_ref[b, i]`` (from ``common.segment_block_bounds``); all of them masked."""
    lo, _, _, hi = rng
    lo = jnp.maximum(lo, bounds_ref[b, i, 0])
    hi = jnp.maximum(jnp.minimum(hi, bounds_ref[b, i, 1]), lo)
    return lo, hi, hi, hi


def tile_ranges(spec, block_range, bounds_ref, b, tile):
    """``(wg_range, lo, hi)``: warpgroup w's block range (``block_range(w)``, narrowed by the
    segment bounds of warpgroup tile ``tile * COMPUTE_WGS + w``) and the program's blocks
    ``[lo, hi)`` covering both warpgroups' ranges, where an empty range adds no blocks."""

    def wg_range(w):
        rng = block_range(w)
        return narrowed(rng, bounds_ref, b, tile * COMPUTE_WGS + w) if spec.segments else rng

    first, last = wg_range(0), wg_range(1)
    hi = jnp.maximum(first[3], last[3])
    lo = jnp.minimum(
        jnp.where(first[0] < first[3], first[0], hi), jnp.where(last[0] < last[3], last[0], hi)
    )
    return wg_range, lo, hi


def load_ids(ref, smem, barrier, layout):
    """Segment ids ``ref`` (a gmem slice) into registers in ``layout``, through ``smem``."""
    plgpu.copy_gmem_to_smem(ref, smem, barrier)
    plgpu.barrier_wait(barrier)
    return plgpu.load(smem, (), layout=layout)


def clip_range(rng, lo_p, hi_p):
    """A warpgroup's ``(lo, full_lo, full_hi, hi)`` cut to the program's blocks ``[lo_p, hi_p)``."""
    lo, full_lo, full_hi, hi = rng
    lo, hi = jnp.maximum(lo, lo_p), jnp.maximum(jnp.minimum(hi, hi_p), lo_p)
    lo = jnp.minimum(lo, hi)
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def run_blocks(lo_p, lo, full_lo, full_hi, hi, hi_p, step, pass_over, carry):
    """Blocks ``[lo_p, hi_p)``: passed over outside ``[lo, hi)``, masked at the edges, plain
    inside. ``step(j, carry, masked)``; ``pass_over(j, _)`` keeps the barrier phases in step."""
    lax.fori_loop(lo_p, lo, pass_over, None)
    carry = lax.fori_loop(lo, full_lo, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(full_hi, hi, functools.partial(step, masked=True), carry)
    lax.fori_loop(hi, hi_p, pass_over, None)
    return carry


def block_ids(row_ids, smem, ready, slot, shape):
    """``(row ids, column ids)`` broadcast over a ``shape`` tile: the rows' ids from registers,
    the columns' from the stage ``slot`` of ``smem`` once ``ready``."""
    plgpu.barrier_wait(ready.at[slot])
    col_ids = plgpu.load(smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
    return lax.broadcast_in_dim(row_ids, shape, [0]), lax.broadcast_in_dim(col_ids, shape, [1])


def positions(shape, row0, col0):
    """``(row positions, column positions)`` of a ``shape`` tile in the WGMMA layout."""
    iota = functools.partial(plgpu.broadcasted_iota, jnp.int32, shape, layout=plgpu.Layout.WGMMA)
    return iota(0) + row0, iota(1) + col0


def smem_transforms(c, dtype):
    """Tiling and swizzle of a ``[rows, c]`` shared-memory operand of wgmma."""
    swizzle = min(128, c * jnp.dtype(dtype).itemsize)
    return (
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle),
    )


def split_refs(refs, n_in, segments):
    """(inputs, (q_seg, kv_seg, bounds) refs or Nones, outputs) of a kernel's flat refs."""
    n = n_in + (3 if segments else 0)
    seg = tuple(refs[n_in:n]) if segments else (None, None, None)
    return refs[:n_in], seg, refs[n:]


def stream_kv(refs, smem, ready, consumed, *, b, kv_head, lo, hi, bk, stages):
    """The producer warpgroup's loop: key/value blocks ``[lo, hi)`` of one kv head (and their
    segment ids, where ``refs[2]`` is not None) into a ring of ``stages`` shared-memory slots,
    each refilled once the compute warpgroups release it."""
    plgpu.set_max_registers(PRODUCER_REGS, action="decrease")
    (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem) = refs, smem
    (k_ready, v_ready, ks_ready), (k_consumed, v_consumed) = ready, consumed

    def slot_of(j):
        return lax.rem(j - lo, stages)

    @pl.loop(lo, hi)
    def _load(j):
        slot = slot_of(j)
        rows = (b, pl.ds(j * bk, bk), kv_head)

        @pl.when(j - lo >= stages)
        def _():
            plgpu.barrier_wait(k_consumed.at[slot])

        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_ready.at[slot])
        if ks_ref is not None:
            ids = ks_ref.at[b, pl.ds(j * bk, bk)]
            plgpu.copy_gmem_to_smem(ids, ks_smem.at[slot], ks_ready.at[slot])

        @pl.when(j - lo >= stages)
        def _():
            plgpu.barrier_wait(v_consumed.at[slot])

        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_ready.at[slot])

    # Observe the last stages' releases too, so no barrier is freed with phases this warpgroup
    # skipped (the GPU interpreter checks this; it costs the idle producer nothing).
    @pl.loop(jnp.maximum(lo, hi - stages), hi)
    def _drain(j):
        plgpu.barrier_wait(k_consumed.at[slot_of(j)])
        plgpu.barrier_wait(v_consumed.at[slot_of(j)])


def _kernel(*refs, spec, bk, nk, stages, groups, nq):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref, bounds_ref), outs = split_refs(refs, 3, spec.segments)
    (o_ref, lse_ref, scoped) = outs
    smem, ready, consumed, turn, seg = scoped
    q_smem2, k_smem, v_smem, lse_smem2 = smem
    k_ready, v_ready, q_ready = ready
    (qs_smem2, ks_smem), (qs_ready, ks_ready) = seg or ((None, None), (None, None))
    k_consumed, v_consumed = consumed
    b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
    tile = lax.axis_index("q")
    if spec.causal:  # the heaviest tiles first, so the grid's tail is short ones
        tile = nq - 1 - tile
    t0 = tile * (COMPUTE_WGS * ROWS)
    wg_range, lo_p, hi_p = tile_ranges(
        spec, lambda w: _wg_range(spec, t0 + w * ROWS, bk, nk), bounds_ref, b, tile
    )

    def slot_of(j):
        return lax.rem(j - lo_p, stages)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(COMPUTE_REGS, action="increase")
        q_smem, lse_smem = q_smem2.at[wg], lse_smem2.at[wg]
        r0 = t0 + wg * ROWS
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(r0, ROWS), h], q_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        if spec.segments:
            q_ids = load_ids(qs_ref.at[b, pl.ds(r0, ROWS)], qs_smem2.at[wg], qs_ready.at[wg],
                             row_layout)  # fmt: skip
        m = plgpu.layout_cast(jnp.full((ROWS,), MASK, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), row_layout)
        acc = jnp.full((ROWS, q_smem.shape[-1]), 0.0, jnp.float32)
        acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
        pl.when(wg == 1)(take_turn)  # the offset that makes the two warpgroups alternate

        def step(j, carry, masked):
            m, l, acc = carry
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, _transposed(k_smem.at[slot]))
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
            ids = None, None
            if spec.segments:  # every block is masked then
                ids = block_ids(q_ids, ks_smem, ks_ready, slot, s.shape)
            plgpu.barrier_arrive(k_consumed.at[slot])
            if spec.soft_cap is None:
                s = s * (spec.scale * LOG2E)
            else:
                s = jnp.tanh(s * (spec.scale / spec.soft_cap)) * (spec.soft_cap * LOG2E)
            if masked:
                ok = common.visible(spec, *positions(s.shape, r0 + spec.offset, j * bk), *ids)
                s = jnp.where(ok, s, MASK)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            if masked:  # a row with nothing visible yet has m_new == MASK and p == 1
                p = jnp.where(ok, p, 0.0)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p = p.astype(q_smem.dtype)
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
            plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may issue its MMAs
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)  # the tensor cores are ours again
            acc = pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_smem.at[slot]))(
                plgpu.ACC.init(acc)
            )
            plgpu.barrier_arrive(v_consumed.at[slot])
            return m_new, l, acc

        def pass_over(j, carry):
            # A block of the program's range that this warpgroup's rows cannot see: keep the
            # barrier phases and the turn-taking in step with the other warpgroup.
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])
            if spec.segments:
                plgpu.barrier_wait(ks_ready.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            take_turn()
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])
            take_turn()
            return carry

        rng = clip_range(wg_range(wg), lo_p, hi_p)
        m, l, acc = run_blocks(lo_p, *rng, hi_p, step, pass_over, (m, l, acc))
        pl.when(wg == 0)(take_turn)  # balances the offset taken by warpgroup 1

        empty = l == 0.0
        l_safe = jnp.where(empty, 1.0, l)
        acc = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        q_smem[...] = acc.astype(q_smem.dtype)
        lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * (1.0 / LOG2E))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(r0, ROWS), h])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(r0, ROWS)])
        plgpu.wait_smem_to_gmem(0)

    pl.when(wg == COMPUTE_WGS)(
        lambda: stream_kv(
            (k_ref, v_ref, ks_ref), (k_smem, v_smem, ks_smem), (k_ready, v_ready, ks_ready),
            consumed, b=b, kv_head=lax.div(h, jnp.int32(groups)), lo=lo_p, hi=hi_p, bk=bk,
            stages=stages,
        )
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("spec", "bk", "stages"))
def forward(
    q, k, v, q_seg=None, kv_seg=None, *, spec: common.MaskSpec, bk: int | None = None, stages=2
):
    """``[B, T, H, C]`` x ``[B, S, K, C]`` -> (out ``[B, T, H, C]``, lse ``[B, H, T]`` fp32).

    ``q_seg [B, T]`` and ``kv_seg [B, S]`` int32 segment ids when ``spec.segments``. ``bk`` keys
    per stage (default ``block_kv(C)``), ``stages`` deep K/V ring.
    """
    b, t, h, c = q.shape
    s, kv = k.shape[1], k.shape[2]
    bk = bk or block_kv(c)
    if t % (COMPUTE_WGS * ROWS) or s % bk:
        raise ValueError(f"pad T to {COMPUTE_WGS * ROWS} and S to {bk} (got T={t}, S={s})")
    nq, nk = t // (COMPUTE_WGS * ROWS), s // bk
    transforms = smem_transforms(c, q.dtype)
    kernel = functools.partial(
        _kernel, spec=spec, bk=bk, nk=nk, stages=stages, groups=h // kv, nq=nq
    )

    args, seg = (q, k, v), None
    if spec.segments:
        bounds = common.segment_block_bounds(q_seg, kv_seg, ROWS, bk)[0]
        args += (q_seg, kv_seg, bounds)
        seg = (
            (plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32)),
            (plgpu.Barrier(num_barriers=COMPUTE_WGS), plgpu.Barrier(num_barriers=stages)),
        )

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            (
                plgpu.SMEM((COMPUTE_WGS, ROWS, c), q.dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, c), k.dtype, transforms=transforms),
                plgpu.SMEM((stages, bk, c), v.dtype, transforms=transforms),
                plgpu.SMEM((COMPUTE_WGS, ROWS), jnp.float32),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            seg,
            collective_axes="wg",
        )

    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((b, h, t), jnp.float32),
    )
    return plgpu.kernel(
        entry,
        out_type=out_types,
        grid=(h, nq, b),
        grid_names=("h", "q", "b"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*args)
