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
from llmjax.models.scan import scan_plan

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
        plan = scan_plan(cfg)
        # Scanned layers hold None here (true layer indices stay the keys of the others).
        self.layers = nnx.List(
            [None if plan.scanned(i) else Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)]
        )
        if plan.repeats:
            self.blocks = nnx.List(
                [
                    _stacked_block(cfg, plan.layer(0, j), plan.repeats, rngs)
                    for j in range(plan.period)
                ]
            )
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

        # One cos/sin table per distinct RoPE config (global and local layers), made out here so
        # that the scanned and the unrolled layers share it.
        tables = {}
        if cfg.position == "rope":
            for rope in {cfg.layer_rope(i) for i in range(cfg.n_layers)}:
                tables[rope] = rope_tables(rope, cfg.resolved_head_dim, positions_BT)

        def run(block, i, x, layer_cache):
            rope_cs = tables[cfg.layer_rope(i)] if cfg.position == "rope" else None
            if cfg.remat != "none":
                call = nnx.remat(lambda b, *a: b(*a), policy=REMAT_POLICIES[cfg.remat])
                return call(block, x, rope_cs, ctx, layer_cache)
            return block(x, rope_cs, ctx, layer_cache)

        plan = scan_plan(cfg)
        new_cache, stats = [], None
        for i in range(cfg.n_layers):
            if plan.scanned(i) and cache is None:
                if i == plan.head:
                    x, layer_stats = self._scan(run, x)
                    stats = _add(stats, layer_stats)
                continue
            # A cache is per layer: a scanned layer then runs alone, on its slice of the stack.
            block = self._stacked_layer(i) if plan.scanned(i) else self.layers[i]
            x, layer_cache, layer_stats = run(block, i, x, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            stats = _add(stats, layer_stats)
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

    def _scan(self, run, x):
        """The scanned layers: one ``lax.scan`` step runs the period's blocks in order."""
        plan = scan_plan(self.cfg)
        graphs, stacks = zip(*(nnx.split(b) for b in self.blocks), strict=True)

        def step(x, states):
            stats = None
            for j, (graph, state) in enumerate(zip(graphs, states, strict=True)):
                x, _, layer_stats = run(nnx.merge(graph, state), plan.layer(0, j), x, None)
                stats = _add(stats, layer_stats)
            return x, stats

        x, stats_R = jax.lax.scan(step, x, stacks)
        return x, (None if stats_R is None else jax.tree.map(lambda a: a.sum(0), stats_R))

    def _stacked_layer(self, i):
        r, j = scan_plan(self.cfg).position(i)
        graph, state = nnx.split(self.blocks[j])
        return nnx.merge(graph, jax.tree.map(lambda a: a[r], state))


def _add(total, stats):
    if stats is None:
        return total
    return stats if total is None else jax.tree.map(jnp.add, total, stats)


def _stacked_block(cfg: ModelConfig, layer: int, repeats: int, rngs: nnx.Rngs) -> Block:
    """``Block(cfg, layer)`` whose parameters hold ``repeats`` independent draws, stacked [R, ...]."""
    keys = jax.random.split(rngs.params(), repeats)

    def draw(key):
        return nnx.to_pure_dict(nnx.state(Block(cfg, layer, rngs=nnx.Rngs(params=key)), nnx.Param))

    block = nnx.eval_shape(lambda: Block(cfg, layer, rngs=nnx.Rngs(0)))
    state = nnx.state(block, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.vmap(draw)(keys))
    for _, var in nnx.to_flat_state(state):
        var.set_metadata("axes", (axes.LAYERS, *var.get_metadata("axes")))
    nnx.update(block, state)
    return block
