"""The decoder-only transformer that every family in llmjax is assembled from."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.layers.attention import Attention
from llmjax.layers.mlp import MLP
from llmjax.layers.moe import MoE, aux_losses
from llmjax.layers.norms import Norm
from llmjax.layers.params import dense
from llmjax.layers.rope import rope_tables

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute each block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@struct.dataclass
class MaskContext:
    """Masking inputs shared by all layers: query slots, segment ids, cache write offsets."""

    q_slot_BT: jax.Array
    q_seg_BT: jax.Array
    kv_seg_BS: jax.Array
    start_B: jax.Array | None = None
    packed: bool = struct.field(pytree_node=False, default=False)


class Block(nnx.Module):
    """Pre-norm residual block; with ``post_norms`` also normalises each sub-block's output.

    The feed-forward is a dense MLP or, in a mixture-of-experts layer, ``MoE``, whose router
    statistics the block returns (None for a dense layer).
    """

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp_norm = Norm(cfg, cfg.d_model)
        self.moe = cfg.is_moe_layer(layer)
        self.mlp = MoE(cfg, rngs=rngs) if self.moe else MLP(cfg, rngs=rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.attn_post_norm = Norm(cfg, cfg.d_model)
            self.mlp_post_norm = Norm(cfg, cfg.d_model)

    def __call__(self, x_BTD, rope_cs, ctx, cache=None):
        h, cache = self.attn(self.attn_norm(x_BTD), rope_cs, ctx, cache)
        if self.post_norms:
            h = self.attn_post_norm(h)
        x_BTD = x_BTD + h
        stats = None
        if self.moe:
            h, stats = self.mlp(self.mlp_norm(x_BTD), ctx.q_seg_BT > 0)
        else:
            h = self.mlp(self.mlp_norm(x_BTD))
        if self.post_norms:
            h = self.mlp_post_norm(h)
        x_BTD = axes.constrain(x_BTD + h, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))
        return x_BTD, cache, stats


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = dtype_of(cfg.param_dtype)
        embed = cfg.init_std * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model))
        self.embed = nnx.Param(embed.astype(pdt), axes=(axes.VOCAB, axes.EMBED))
        if cfg.position == "learned":
            pos = 0.01 * jax.random.normal(rngs.params(), (cfg.max_seq_len, cfg.d_model))
            self.pos_embed = nnx.Param(pos.astype(pdt), axes=(axes.POSITIONS, axes.EMBED))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, cfg.d_model)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg, rngs, (cfg.d_model, cfg.vocab_size), (axes.EMBED, axes.VOCAB))

    def __call__(
        self,
        tokens_BT,
        positions_BT,
        ctx: MaskContext,
        cache=None,
        logit_index_BN=None,
        unembed=True,
    ):
        cfg, dt = self.cfg, dtype_of(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dt)
        x = axes.constrain(x, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED))

        tables = {}  # one cos/sin table per distinct RoPE config (global and local layers)
        new_cache, stats = [], None
        for i, block in enumerate(self.layers):
            rope_cs = None
            if cfg.position == "rope":
                rope = cfg.layer_rope(i)
                if rope not in tables:
                    tables[rope] = rope_tables(rope, cfg.resolved_head_dim, positions_BT)
                rope_cs = tables[rope]
            layer_cache = None if cache is None else cache[i]
            if cfg.remat != "none":
                call = nnx.remat(lambda b, *a: b(*a), policy=REMAT_POLICIES[cfg.remat])
                x, layer_cache, layer_stats = call(block, x, rope_cs, ctx, layer_cache)
            else:
                x, layer_cache, layer_stats = block(x, rope_cs, ctx, layer_cache)
            new_cache.append(layer_cache)
            if layer_stats is not None:
                stats = layer_stats if stats is None else jax.tree.map(jnp.add, stats, layer_stats)
        aux = {} if stats is None else aux_losses(stats, cfg.n_experts)
        new_cache = None if cache is None else tuple(new_cache)

        if logit_index_BN is not None:  # e.g. a prefill needs only the last prompt token's logits
            x = jnp.take_along_axis(x, logit_index_BN[:, :, None], axis=1)
        x = self.final_norm(x)
        if not unembed:  # a scalar head reads the hidden states; [B, T, V] is never formed
            x = axes.constrain(
                x.astype(jnp.float32), (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_EMBED)
            )
            return x, new_cache, aux
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", x, self.embed[...].astype(dt))
        else:
            logits = jnp.einsum("BTD,DV->BTV", x, self.lm_head[...].astype(dt))
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = cap * jnp.tanh(logits / cap)
        logits = axes.constrain(logits, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_VOCAB))
        return logits, new_cache, aux
