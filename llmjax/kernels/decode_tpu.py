"""Decode attention as a Pallas Mosaic TPU kernel: cache blocks are the sequential grid axis.

``lengths`` is scalar-prefetched into SMEM so that index maps can clamp to the last filled block:
blocks past a sequence's length repeat the previous block index, which the pipeline turns into no
DMA at all, and ``pl.when`` skips their compute. A paged cache scalar-prefetches its page table
too: one grid step per page, whose index map turns (sequence, logical page) into a pool page, so
pages are fetched straight from the pool with no gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from llmjax.kernels import common
from llmjax.kernels.decode import kv_range, zero_past_length

_F32 = jnp.float32


def _kernel(lens_ref, *refs, spec, t, g, bk, nk, paged):
    # A page table, when there is one, is only read by the index maps.
    q_ref, k_ref, v_ref, o_ref, m_scr, l_scr, acc_scr = refs[1:] if paged else refs
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


def decode(q_BKRC, k, v, lengths, page_table, spec, t, g, bk, interpret):
    """``q_BKRC`` folded rows and caches ``[B, K, S, C]`` padded to ``bk``, or with
    ``page_table`` ``[B, M]`` pools ``[K, P, bk, C]`` -> fp32 ``[B, K, R, C]``."""
    b, kv_heads, rows, c = q_BKRC.shape
    paged = page_table is not None
    nk = page_table.shape[1] if paged else k.shape[2] // bk

    def block(bi, j, lens):
        lo, hi = kv_range(lens[bi], t, spec.window, bk)
        return jnp.clip(j, lo, jnp.maximum(hi - 1, lo))

    if paged:
        pool = k.shape[1]
        # The table is flattened: SMEM pads a 2D array's last dimension to 128 words.
        scalars = (lengths, page_table.reshape(-1))

        def kv_index(bi, ki, j, lens, table):
            page = table[bi * nk + block(bi, j, lens)]
            return ki, jnp.clip(page, 0, pool - 1), 0, 0

    else:
        scalars = (lengths,)

        def kv_index(bi, ki, j, lens):
            return bi, ki, block(bi, j, lens), 0

    kv_block = (None, None, bk, c)  # one page of a pool, or bk slots of a sequence's cache
    q_index = lambda bi, ki, j, *_: (bi, ki, 0, 0)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(b, kv_heads, nk),
        in_specs=[
            pl.BlockSpec((None, None, rows, c), q_index),
            pl.BlockSpec(kv_block, kv_index),
            pl.BlockSpec(kv_block, kv_index),
        ],
        out_specs=pl.BlockSpec((None, None, rows, c), q_index),
        scratch_shapes=[
            pltpu.VMEM((rows, 1), _F32),
            pltpu.VMEM((rows, 1), _F32),
            pltpu.VMEM((rows, c), _F32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec, t=t, g=g, bk=bk, nk=nk, paged=paged),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kv_heads, rows, c), _F32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="decode_attention_tpu",
    )(*scalars, q_BKRC, k, v)
