"""Scaled dot-product attention with llmjax's masking rules, and the switch between implementations.

Masks are built from *slots* (indices into the key/value sequence), never from RoPE positions, so
packed documents, left padding and KV caches all use one rule: query at slot i sees key at slot j iff
``j <= i``, ``i - j < window`` (local layers) and both carry the same segment id. Segment id 0 marks
padding: padded keys are invisible to real tokens.

Keys and values arrive ``[B, S, K, C]`` when they were just projected, and ``[B, K, S, C]``
(heads-major) when they come from a KV cache: a decode step's attention is then a batched matmul over
(B, K) on contiguous slots, with no per-step transpose of the whole cache. A sliding-window layer's
ring buffer (``attend_ring``) holds its keys in rotated order, each entry tagged with its slot, so
the same rule applies with the entry's slot in place of its index.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


@functools.cache
def _warn_once(message: str):
    log.warning(message)


def attention_mask(q_slot_BT, q_seg_BT, kv_seg_BS, window, kv_slot_BS=None):
    """Boolean [B, T, S] visibility of key slots for each query.

    Key s sits at slot s, or at ``kv_slot_BS[b, s]`` when given (a ring buffer's entries).
    """
    if kv_slot_BS is None:
        kv_slot_BS = jnp.arange(kv_seg_BS.shape[1], dtype=jnp.int32)[None]
    dist_BTS = q_slot_BT[:, :, None] - kv_slot_BS[:, None, :]
    mask = (dist_BTS >= 0) & (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :])
    if window is not None:
        mask &= dist_BTS < window
    return mask


def _grouped_logits(q_BTHC, k, kv, *, scale, softcap):
    """Float32 logits ``[B, K, G, T, S]``: the G query heads of each kv head against its keys."""
    B, T, H, C = q_BTHC.shape
    K = k.shape[kv.index("K")]
    q_BTKGC = q_BTHC.reshape(B, T, K, H // K, C)
    logits = jnp.einsum(
        f"BTKGC,{kv}->BKGTS", q_BTKGC, k, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _masked_softmax(logits, mask_BTS):
    mask = mask_BTS[:, None, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    # A query that sees no key (e.g. padding) returns zeros rather than an average of masked values.
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def _heads_major_values(probs, v_BKSC):
    """``probs @ v`` as ``[B, T, H, C]`` for a heads-major ``v``.

    Asked for "BTKGC" directly, XLA:CPU emits this product as [B, K, C, G] (transposed) and runs
    it 3-6x slower; the canonical batched-matmul order plus a small transpose is not.
    """
    B, K, G, T, _ = probs.shape
    out = jnp.einsum("BKGTS,BKSC->BKGTC", probs.astype(v_BKSC.dtype), v_BKSC)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, -1)


def xla_attention(q_BTHC, k, v, mask_BTS, *, scale, softcap, heads_major=False):
    """Reference attention: grouped heads share K/V without materialising copies.

    ``k`` and ``v`` are ``[B, S, K, C]``, or ``[B, K, S, C]`` with ``heads_major``.
    """
    B, T, H, C = q_BTHC.shape
    kv = "BKSC" if heads_major else "BSKC"
    logits = _grouped_logits(q_BTHC, k, kv, scale=scale, softcap=softcap)
    probs = _masked_softmax(logits, mask_BTS)
    if heads_major:
        return _heads_major_values(probs, v)
    out = jnp.einsum(f"BKGTS,{kv}->BTKGC", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, C)


def ring_attention(q_BTHC, ring, new, mask_old_BTR, mask_new_BTS, *, scale, softcap):
    """Attention over a ring buffer's old entries followed by the call's own new keys.

    ``ring`` is ``(k, v)`` heads-major ``[B, K, R, C]``, ``new`` is ``(k, v)`` ``[B, T, K, C]``.
    One softmax spans both, so the result is that of attending over their concatenation (up to
    summation order) without copying the ring to concatenate it.
    """
    B, T, H, C = q_BTHC.shape
    R = ring[0].shape[2]
    logits = jnp.concatenate(
        [
            _grouped_logits(q_BTHC, ring[0], "BKSC", scale=scale, softcap=softcap),
            _grouped_logits(q_BTHC, new[0], "BSKC", scale=scale, softcap=softcap),
        ],
        axis=-1,
    )
    probs = _masked_softmax(logits, jnp.concatenate([mask_old_BTR, mask_new_BTS], axis=-1))
    old = _heads_major_values(probs[..., :R], ring[1])
    fresh = jnp.einsum("BKGTS,BSKC->BTKGC", probs[..., R:].astype(new[1].dtype), new[1])
    return old + fresh.reshape(B, T, H, C).astype(old.dtype)


def attend(
    q,
    k,
    v,
    *,
    q_slot,
    q_seg,
    kv_seg,
    window,
    softcap,
    scale,
    impl,
    decode_lengths=None,
    packed=False,
):
    """Dispatch to the configured implementation, falling back to XLA with a stated reason.

    ``decode_lengths`` is set when keys come from a KV cache (``[B, K, S, C]``; valid slots per
    sequence after this step's write); ``packed`` says whether segment ids or padding are in play.
    """
    cached = decode_lengths is not None
    if impl == "pallas":
        from llmjax import kernels

        # With no accelerator the kernels run in Pallas interpret mode: slow, but the same code.
        interpret = jax.default_backend() == "cpu"
        if not cached:
            segments = (q_seg, kv_seg) if packed else None
            return kernels.flash_attention(
                q, k, v, causal=True, sliding_window=window, segment_ids=segments,
                logit_soft_cap=softcap, scale=scale, interpret=interpret,
            )  # fmt: skip
        if not packed:
            return kernels.decode_attention(
                q, k, v, decode_lengths, sliding_window=window, logit_soft_cap=softcap,
                scale=scale, interpret=interpret,
            )  # fmt: skip
        _warn_once(
            "attention_impl='pallas': a KV cache holding padding or segments uses XLA "
            "attention (the decode kernel masks by length only)"
        )
    elif impl == "cudnn":
        if jax.default_backend() != "gpu":
            _warn_once(
                f"attention_impl='cudnn' needs a GPU (backend is {jax.default_backend()}); "
                "using XLA attention"
            )
        elif q.dtype not in (jnp.bfloat16, jnp.float16):
            _warn_once(
                f"attention_impl='cudnn' needs bf16 or fp16 (compute dtype is {q.dtype}); "
                "using XLA attention"
            )
        elif softcap is not None:
            _warn_once(
                "attention_impl='cudnn': cuDNN has no logit soft-capping; using XLA attention"
            )
        elif not cached and not packed:
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=True,
                implementation="cudnn",
                local_window_size=None if window is None else (window - 1, 0),
            )
        elif not cached or q.shape[1] > 1:
            # cuDNN wants [B, S, K, C]: transposing a cache is worth it for a prefill, not for
            # a one-token decode step (below, XLA reads the heads-major cache as it is).
            if cached:
                k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
            mask = attention_mask(q_slot, q_seg, kv_seg, window)[:, None]
            return jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, implementation="cudnn"
            )
    return xla_attention(
        q,
        k,
        v,
        attention_mask(q_slot, q_seg, kv_seg, window),
        scale=scale,
        softcap=softcap,
        heads_major=cached,
    )


def attend_ring(q, ring, new, mask_old_BTR, mask_new_BTS, *, softcap, scale, impl):
    """A sliding-window layer's cached attention over its ring buffer (see ``ring_attention``).

    Always XLA: the decode kernel and cuDNN read a cache's slots in order and mask them by length,
    while a ring holds its slots rotated, each at the position ``mask_old_BTR`` was built from.
    """
    if impl != "xla":
        _warn_once(
            f"attention_impl={impl!r}: sliding-window layers with a ring-buffer KV cache use XLA "
            "attention (the kernels read cache slots in order); init_cache(..., ring=False) "
            "keeps full caches they can read"
        )
    return ring_attention(q, ring, new, mask_old_BTR, mask_new_BTS, scale=scale, softcap=softcap)
