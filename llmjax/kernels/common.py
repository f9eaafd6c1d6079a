"""Mask semantics and per-block math shared by the XLA reference and every Pallas kernel.

Positions: key ``j`` sits at position ``j``; query ``i`` of a ``[T]`` block attending to ``[S]``
keys sits at ``i + offset`` with ``offset = S - T`` (bottom-right aligned), or at a per-sequence
slot in decode. A key is visible iff every enabled rule says so:

    causal          pos_k <= pos_q
    sliding_window  pos_q - pos_k < window         (window keys, the query's own included)
    segment ids     seg_k == seg_q
    kv length       pos_k < kv_len                 (padding, or decode's filled cache slots)

Keeping these in one place is what makes "kernel == reference" a meaningful test.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf: exp(MASK_VALUE - m) underflows to 0 without inf - inf = NaN, and
# autodiff through ``where`` never meets an infinity.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of which keys a query sees (hashable: it is a jit static argument)."""

    causal: bool
    window: int | None
    offset: int  # query row i sits at position i + offset
    kv_len: int  # keys at positions >= kv_len are padding
    segments: bool
    soft_cap: float | None
    scale: float


def visible(spec: MaskSpec, q_pos, k_pos, q_seg=None, k_seg=None):
    """Boolean visibility, broadcasting ``q_pos`` ([..., T, 1]) against ``k_pos`` ([..., 1, S])."""
    ok = k_pos < spec.kv_len
    if spec.causal:
        ok = ok & (k_pos <= q_pos)
    if spec.window is not None:
        ok = ok & (q_pos - k_pos < spec.window)
    if spec.segments:
        ok = ok & (q_seg == k_seg)
    return ok


def scaled_logits(spec: MaskSpec, q, k, precision=None):
    """``[bq, C] x [bk, C] -> [bq, bk]`` fp32 logits, scaled then soft-capped; also tanh or None."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )
    s = s * spec.scale
    if spec.soft_cap is None:
        return s, None
    t = jnp.tanh(s / spec.soft_cap)
    return spec.soft_cap * t, t


def online_softmax_step(spec, carry, q, k, v, mask, precision=None):
    """One key block of the flash forward: rescale the running max, sum and accumulator.

    ``carry = (m [bq,1], l [bq,1], acc [bq,C])`` in fp32; ``mask`` is None for blocks known to be
    fully visible (the common interior case, where skipping the mask saves VPU/ALU work).
    """
    m, l, acc = carry
    s, _ = scaled_logits(spec, q, k, precision)
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    if mask is not None:
        # A row with nothing visible yet has m_new == MASK_VALUE and p == 1: zero it explicitly.
        p = jnp.where(mask, p, 0.0)
    l = alpha * l + jnp.sum(p, axis=-1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(v.dtype),
        v,
        (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,
        precision=precision,
    )
    return m_new, l, alpha * acc + pv


def finish_softmax(m, l, acc):
    """Normalise; rows that saw no key give 0 output and lse = -inf (never NaN)."""
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse


def backward_block(spec, q, k, v, do, lse, delta, mask, precision=None):
    """Recompute P for one (query block, key block) pair and return (dS, P) in fp32.

    ``lse`` must be +inf (not -inf) for rows with nothing visible so that P is exactly 0 there.
    ``delta`` = rowsum(dO * O) minus the cotangent of lse (d lse / d s = P folds in the same way).
    """
    s, t = scaled_logits(spec, q, k, precision)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = jax.lax.dot_general(
        do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
    )
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    return ds, p


def floor_div(a, b: int):
    """Floor division that also lowers where ``sign`` does not (Mosaic asks the chip for it).

    Positions are bounded by a few million, so shifting the numerator by a large multiple of
    ``b`` makes it non-negative and truncating division then equals floor division.
    """
    if isinstance(a, int):
        return a // b
    shift = (1 << 30) // b
    return jax.lax.div(a + shift * b, jnp.int32(b)) - shift


def kv_block_range(spec: MaskSpec, q_first, q_last, bk: int, nk: int):
    """Key blocks that a query block spanning positions [q_first, q_last] must visit.

    Returns ``(lo, full_lo, full_hi, hi)``: blocks in [lo, hi) may hold visible keys; those in
    [full_lo, full_hi) are visible to every row of the block and need no mask. Works on traced
    ints; floor division keeps negative positions (T > S) correct.
    """
    hi = nk
    full_hi = spec.kv_len // bk
    if spec.causal:
        hi = jnp.minimum(hi, floor_div(q_last, bk) + 1)
        full_hi = jnp.minimum(full_hi, floor_div(q_first + 1, bk))
    lo = 0
    full_lo = 0
    if spec.window is not None:
        lo = jnp.maximum(0, floor_div(q_first - spec.window + 1, bk))
        full_lo = -floor_div(spec.window - 1 - q_last, bk)  # ceil division
    hi = jnp.maximum(hi, 0)
    lo = jnp.minimum(lo, hi)
    if spec.segments:
        full_lo = full_hi = hi  # segment masks are data-dependent: mask every block
    full_lo = jnp.clip(full_lo, lo, hi)
    full_hi = jnp.clip(full_hi, full_lo, hi)
    return lo, full_lo, full_hi, hi


def q_block_range(spec: MaskSpec, k_first, k_last, bq: int, nq: int):
    """Query blocks (row index units) whose queries may see keys at [k_first, k_last]."""
    lo, hi = 0, nq
    if spec.causal:  # need pos_q >= k_first, i.e. row >= k_first - offset
        lo = jnp.maximum(0, floor_div(k_first - spec.offset, bq))
    if spec.window is not None:  # need pos_q < k_last + window
        hi = jnp.minimum(nq, floor_div(k_last + spec.window - 1 - spec.offset, bq) + 1)
    hi = jnp.maximum(hi, 0)
    lo = jnp.minimum(lo, hi)
    return lo, hi


def segment_block_bounds(q_seg_BT, kv_seg_BS, bq: int, bk: int):
    """Block ranges that segment ids leave visible, for skipping whole blocks of packed documents.

    Two blocks whose id ranges ``[min, max]`` are disjoint share no id, so no key of one is
    visible to a query of the other: that holds for any ids, sorted or not. Returns int32
    ``kv_bounds [B, nq, 2]`` (for query block i, the key blocks ``[lo, hi)`` between the first and
    last block whose range meets its own) and ``q_bounds [B, nk, 2]`` (the same per key block).
    With documents packed contiguously the blocks in between meet it too, so the range is exact;
    otherwise it is a superset and the per-element mask does the rest. An empty range is (0, 0).
    """
    b, t = q_seg_BT.shape
    s = kv_seg_BS.shape[1]
    q_blocks = q_seg_BT.reshape(b, t // bq, bq)
    k_blocks = kv_seg_BS.reshape(b, s // bk, bk)
    q_min, q_max = q_blocks.min(-1), q_blocks.max(-1)
    k_min, k_max = k_blocks.min(-1), k_blocks.max(-1)
    meets = (q_min[:, :, None] <= k_max[:, None, :]) & (k_min[:, None, :] <= q_max[:, :, None])

    def span(m):
        n = m.shape[-1]
        first = jnp.argmax(m, axis=-1)
        last = n - jnp.argmax(m[..., ::-1], axis=-1)
        some = m.any(axis=-1)
        return jnp.stack([jnp.where(some, first, 0), jnp.where(some, last, 0)], -1).astype(
            jnp.int32
        )

    return span(meets), span(jnp.swapaxes(meets, 1, 2))


def narrow(lo, hi, bounds_ref, at=0):
    """``[lo, hi)`` intersected with the ``(lo, hi)`` pair at ``bounds_ref[at : at + 2]``; stays
    ordered."""
    lo = jnp.maximum(lo, bounds_ref[at])
    hi = jnp.maximum(jnp.minimum(hi, bounds_ref[at + 1]), lo)
    return lo, hi
