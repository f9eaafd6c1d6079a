"""Multi-head attention with GQA/MQA, optional q/k norms, biases, RoPE and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.layers.attend import attend, attend_ring
from llmjax.layers.norms import Norm
from llmjax.layers.params import dense, flat_einsum, project, zeros
from llmjax.layers.rope import apply_rope


def write_cache(cache_BKSC, new_BTKC, start_B):
    """Write each sequence's new keys (or values) at its own start slot of a heads-major cache."""
    new_BKTC = jnp.swapaxes(new_BTKC, 1, 2).astype(cache_BKSC.dtype)
    update = lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, s, 0))
    return jax.vmap(update)(cache_BKSC, new_BKTC, start_B)


@struct.dataclass
class RingPlan:
    """One call's use of the ring buffers of the sliding-window layers (the same for all of them).

    ``mask_old_BTR``: which ring entries each new token sees; ``mask_new_BTT``: which of the
    call's own tokens it sees; ``target_BT``: the ring entry each new token is written to, or R
    (dropped) for padding and for a token that a later one of the same call replaces.
    """

    mask_old_BTR: jax.Array
    mask_new_BTT: jax.Array
    target_BT: jax.Array


def write_ring(ring_BKRC, new_BTKC, target_BT):
    """Scatter each sequence's new keys (or values) into their ring entries; R drops a token.

    The kept targets of a row are distinct, so the scatter is deterministic (and in place when
    the ring's buffer is donated).
    """
    rows_B1 = jnp.arange(ring_BKRC.shape[0])[:, None]
    # Indices split by a slice put their broadcast axes first: ring[rows, :, target] is [B, T, K, C].
    return ring_BKRC.at[rows_B1, :, target_BT].set(new_BTKC.astype(ring_BKRC.dtype), mode="drop")


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        D, H, K, C = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        self.window = cfg.layer_window(layer)
        self.softcap, self.scale = cfg.attn_logit_softcap, cfg.resolved_query_scale
        self.impl, self.dtype = cfg.attention_impl, dtype_of(cfg.dtype)
        self.wq = dense(cfg, rngs, (D, H, C), (axes.EMBED, axes.HEADS, axes.HEAD_DIM))
        self.wk = dense(cfg, rngs, (D, K, C), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
        self.wv = dense(cfg, rngs, (D, K, C), (axes.EMBED, axes.KV_HEADS, axes.HEAD_DIM))
        self.wo = dense(
            cfg, rngs, (H, C, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), depth_scaled=True
        )
        self.qkv_bias, self.out_bias = cfg.qkv_bias, cfg.out_bias
        if cfg.qkv_bias:
            self.bq = zeros(cfg, (H, C), (axes.HEADS, axes.HEAD_DIM))
            self.bk = zeros(cfg, (K, C), (axes.KV_HEADS, axes.HEAD_DIM))
            self.bv = zeros(cfg, (K, C), (axes.KV_HEADS, axes.HEAD_DIM))
        if cfg.out_bias:
            self.bo = zeros(cfg, (D,), (axes.EMBED,))
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, C, axis_name=axes.HEAD_DIM)
            self.k_norm = Norm(cfg, C, axis_name=axes.HEAD_DIM)

    def __call__(self, x_BTD, rope_cs, ctx, cache=None):
        """``ctx`` holds the masking inputs shared by all layers (see ``Transformer``).

        ``cache`` is the layer's ``(k, v)`` ``[B, K, S, C]``, or for a sliding-window layer with a
        ring buffer ``(k, v, RingPlan)`` with ``[B, K, R, C]`` rings. Returns the block output and,
        with a cache, the layer's updated ``(k, v)``.
        """
        dt = self.dtype
        q = project("BTD,DHC->BTHC", x_BTD, self.wq, dt)
        k = project("BTD,DKC->BTKC", x_BTD, self.wk, dt)
        v = project("BTD,DKC->BTKC", x_BTD, self.wv, dt)
        if self.qkv_bias:
            q, k, v = (
                q + self.bq[...].astype(dt),
                k + self.bk[...].astype(dt),
                v + self.bv[...].astype(dt),
            )
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope_cs is not None:
            q, k = apply_rope(q, *rope_cs), apply_rope(k, *rope_cs)
        q = axes.constrain(q, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_HEADS, None))
        if cache is not None and len(cache) == 3:
            out, cache = self._ring(q, k, v, *cache)
        else:
            decode_lengths = None
            if cache is not None:
                k = write_cache(cache[0], k, ctx.start_B)
                v = write_cache(cache[1], v, ctx.start_B)
                cache = (k, v)
                k, v = k.astype(dt), v.astype(dt)
                decode_lengths = ctx.start_B + x_BTD.shape[1]
            out = attend(
                q,
                k,
                v,
                q_slot=ctx.q_slot_BT,
                q_seg=ctx.q_seg_BT,
                kv_seg=ctx.kv_seg_BS,
                window=self.window,
                softcap=self.softcap,
                scale=self.scale,
                impl=self.impl,
                decode_lengths=decode_lengths,
                packed=ctx.packed,
            )
        # One [H*C, D] matmul: with "BTHC,HCD" XLA:CPU may pick a (C, H) activation layout and then
        # transpose the whole weight on every call (every decode step).
        B, T, H, C = out.shape
        if hasattr(self.wo.get_value(), "project"):  # quantized or LoRA-adapted
            out_BTD = project("BTHC,HCD->BTD", out.astype(dt), self.wo, dt)
        else:
            out_BTD = flat_einsum("BTHC,HCD->BTD", out.astype(dt), self.wo[...].astype(dt), 2)
        if self.out_bias:
            out_BTD = out_BTD + self.bo[...].astype(dt)
        return out_BTD, cache

    def _ring(self, q, k_BTKC, v_BTKC, k_ring, v_ring, plan: RingPlan):
        """Attend over the ring's old entries and the new keys, then write the new keys.

        Attending before writing lets one call hold more tokens than the ring (a long prefill).
        The new keys are rounded to the cache dtype first: the full cache's attention reads them
        back from the cache, so the two see the same values.
        """
        dt = self.dtype
        new = tuple(x.astype(k_ring.dtype).astype(dt) for x in (k_BTKC, v_BTKC))
        out = attend_ring(
            q,
            (k_ring.astype(dt), v_ring.astype(dt)),
            new,
            plan.mask_old_BTR,
            plan.mask_new_BTT,
            softcap=self.softcap,
            scale=self.scale,
            impl=self.impl,
        )
        k_ring = write_ring(k_ring, k_BTKC, plan.target_BT)
        return out, (k_ring, write_ring(v_ring, v_BTKC, plan.target_BT))
