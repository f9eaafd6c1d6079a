"""Decode attention as a Pallas Mosaic TPU kernel: cache blocks are the sequential grid axis.

``lengths`` is scalar-prefetched into SMEM so that index maps can clamp to the last filled block:
blocks past a sequence's length repeat the previous block index, which the pipeline turns into no
DMA at all, and ``pl.when`` skips their compute.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels import common
from kernels.decode import kv_range, zero_past_length

_F32 = jnp.float32


def _kernel(lens_ref, q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr, *, spec, t, g, bk, nk):
    b, j = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, common.MASK_VALUE, _F32)
        l_scr[...] = jnp.zeros(l_scr.shape, _F32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, _F32)

    lo, hi = kv_range(length, t, spec.window, bk)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        q = q_ref[...]
        rows = q.shape[0]
        r = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        q_pos = length - t + jax.lax.div(r, jnp.int32(g))
        k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        mask = common.visible(spec, q_pos, k_pos) & (k_pos < length)
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        carry = (m_scr[...], l_scr[...], acc_scr[...])
        v = zero_past_length(v_ref[...], j * bk, length)
        m, l, acc = common.online_softmax_step(spec, carry, q, k_ref[...], v, mask, precision)
        m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

    @pl.when(j == nk - 1)
    def _finish():
        out, _ = common.finish_softmax(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out


def decode(q_BKRC, k, v, lengths, spec, t, g, bk, interpret):
    """``q_BKRC`` folded rows, caches ``[B, K, S, C]`` padded to ``bk`` -> fp32 ``[B, K, R, C]``."""
    b, kv_heads, rows, c = q_BKRC.shape
    nk = k.shape[2] // bk

    def kv_index(bi, ki, j, lens):
        lo, hi = kv_range(lens[bi], t, spec.window, bk)
        return bi, ki, jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, kv_heads, nk),
        in_specs=[
            pl.BlockSpec((None, None, rows, c), lambda bi, ki, j, lens: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, bk, c), kv_index),
            pl.BlockSpec((None, None, bk, c), kv_index),
        ],
        out_specs=pl.BlockSpec((None, None, rows, c), lambda bi, ki, j, lens: (bi, ki, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((rows, 1), _F32),
            pltpu.VMEM((rows, 1), _F32),
            pltpu.VMEM((rows, c), _F32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, t=t, g=g, bk=bk, nk=nk),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, rows, c), _F32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="decode_attention_tpu",
    )(lengths, q_BKRC, k, v)
