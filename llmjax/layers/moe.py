"""The mixture-of-experts feed-forward: a router, top-k routing and dropless grouped matmuls.

Each token picks ``experts_per_token`` of ``n_experts`` gated MLPs from a router's scores and sums
their outputs weighted by its routing weights. Dispatch is dropless by default: the N * R
token-to-expert assignments are sorted by expert, and ``jax.lax.ragged_dot`` runs each expert's
matmul on its contiguous group of rows, however many there are, so no token is ever dropped and
no compute is spent on padding. ``moe_dispatch="capacity"`` instead gives each expert a fixed
buffer of ``ceil(capacity_factor * N * R / E)`` rows (static shapes, batched einsums); assignments
beyond it are dropped (their token keeps only the residual and the other experts' outputs).

The layer also returns the sums the auxiliary losses are made of (``RouterStats``), so the model
can average them over layers exactly as transformers' ``load_balancing_loss_func`` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.layers import expert_parallel
from llmjax.layers.mlp import ACTIVATION_FNS, MLP
from llmjax.layers.params import dense, project

# The name of the per-expert selection bias in every MoE layer's parameters: the optimizer finds
# these leaves by it (``llmjax.train.optim``).
SELECTION_BIAS = "selection_bias"


def route(
    logits_NE,
    k: int,
    kind: str = "softmax",
    norm_topk: bool = True,
    bias_E=None,
    mask_N=None,
):
    """``(weights_NR, experts_NR, probs_NE)``: each token's k experts, their weights, all scores.

    ``softmax`` (Mixtral, Qwen3-MoE): probabilities over all experts, the k largest kept.
    ``sigmoid`` (DeepSeek-V3's scoring, without its expert groups): an independent score per
    expert; ``probs_NE`` are then the scores normalised per token, which is what the balancing
    loss compares with the load. ``norm_topk`` rescales the k weights of each token to sum to 1.
    Ties go to the lower expert index.

    ``bias_E`` is DeepSeek-V3's auxiliary-loss-free balancing bias: added to the scores to choose
    the k experts, while the weights stay the unbiased scores of the chosen ones. Choosing is
    discrete, so its true gradient is zero; its gradient here is instead a pseudo-gradient, this
    call's load per expert minus the mean load over the real tokens (``mask_N``; all when None),
    whatever the loss, which ``llmjax.train.optim`` turns into ``-gamma * sign``.
    """
    logits_NE = logits_NE.astype(jnp.float32)
    if kind == "softmax":
        scores_NE = jax.nn.softmax(logits_NE, axis=-1)
        probs_NE = scores_NE
    else:
        scores_NE = jax.nn.sigmoid(logits_NE)
        probs_NE = scores_NE / scores_NE.sum(-1, keepdims=True)
    if bias_E is None:
        weights_NR, experts_NR = jax.lax.top_k(scores_NE, k)
    else:
        biased_NE = scores_NE + jax.lax.stop_gradient(bias_E).astype(jnp.float32)
        _, experts_NR = jax.lax.top_k(biased_NE, k)
        weights_NR = jnp.take_along_axis(scores_NE, experts_NR, axis=-1)
        if mask_N is None:
            mask_N = jnp.ones(experts_NR.shape[:1], bool)
        load_E = expert_load(experts_NR, mask_N, logits_NE.shape[-1])
        weights_NR = _with_load_gradient(weights_NR, bias_E, load_E)
    if norm_topk:
        weights_NR = weights_NR / weights_NR.sum(-1, keepdims=True)
    return weights_NR, experts_NR, probs_NE


@jax.custom_vjp
def _with_load_gradient(weights_NR, bias_E, load_E):
    # The identity on the weights, so the bias can receive its pseudo-gradient through them:
    # every real loss reaches the weights, so its backward pass always runs this one.
    del bias_E, load_E
    return weights_NR


def _with_load_gradient_fwd(weights_NR, bias_E, load_E):
    return weights_NR, ((load_E - load_E.mean()).astype(bias_E.dtype), load_E)


def _with_load_gradient_bwd(res, ct_NR):
    # The cotangent is not scaled into the pseudo-gradient: loads summed over micro-batches (and
    # over the devices of a batch) are then the step's loads, whatever each micro-batch weighs.
    excess_E, load_E = res
    return ct_NR, excess_E, jnp.zeros_like(load_E)


_with_load_gradient.defvjp(_with_load_gradient_fwd, _with_load_gradient_bwd)


def expert_load(experts_NR, mask_N, n_experts: int):
    """Assignments per expert ``[E]`` (float32) over the real tokens ``mask_N``, no gradient."""
    R = experts_NR.shape[-1]
    m_A = jnp.repeat(mask_N.astype(jnp.float32), R)
    load_E = jnp.zeros((n_experts,), jnp.float32).at[experts_NR.reshape(-1)].add(m_A)
    return jax.lax.stop_gradient(load_E)


def router_stats(logits_NE, experts_NR, probs_NE, mask_N) -> dict:
    """Sums over the real tokens (``mask_N``) of one layer: what the auxiliary losses need.

    ``load``: assignments per expert ``[E]``; ``prob``: router probability per expert ``[E]``;
    ``tokens``: real tokens; ``z``: sum of ``logsumexp(logits) ** 2``.
    """
    m_N = mask_N.astype(jnp.float32)
    lse_N = jax.nn.logsumexp(logits_NE.astype(jnp.float32), axis=-1)
    return {
        "load": expert_load(experts_NR, mask_N, logits_NE.shape[-1]),
        "prob": (probs_NE * m_N[:, None]).sum(0),
        "tokens": m_N.sum(),
        "z": (jnp.square(lse_N) * m_N).sum(),
    }


def aux_losses(stats: dict, n_experts: int) -> dict:
    """``balance_loss`` and ``router_z_loss`` from ``router_stats`` summed over the MoE layers.

    The balancing loss is Switch Transformer's ``E * sum_e f_e * P_e`` in the form transformers
    computes for Mixtral and Qwen3-MoE: ``f_e`` is the expert's share of top-k assignments per
    token (so ``sum_e f_e = k``) and ``P_e`` its mean router probability, both averaged over every
    real token of every MoE layer before the product (equal to 1 * k when perfectly balanced).
    The z-loss is ST-MoE's ``mean(logsumexp(logits) ** 2)`` over the same tokens and layers.
    """
    rows = jnp.maximum(stats["tokens"], 1.0)
    balance = n_experts * jnp.sum((stats["load"] / rows) * (stats["prob"] / rows))
    return {"balance_loss": balance, "router_z_loss": stats["z"] / rows}


def _sort_by_expert(experts_NR, n_experts: int):
    """Assignment order sorted by expert (stable: token order within an expert) and group sizes."""
    expert_A = experts_NR.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    sizes_E = jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)
    return order_A, expert_A[order_A], sizes_E


def _unsort(y_AD, order_A):
    # The inverse permutation gathers each assignment's output back to (token, route) order, so a
    # token's k outputs are summed by a plain reduction rather than a scatter-add.
    inverse_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(order_A.shape[0]))
    return y_AD[inverse_A]


class MoE(nnx.Module):
    """Router ``[D, E]``, experts ``gate, up [E, D, F]``, ``down [E, F, D]``; optional shared MLP.

    A shared MLP runs on every token; ``shared_expert_gate`` scales its output per token by
    ``sigmoid(x . shared_gate)`` (Qwen2-MoE).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, E, F = cfg.d_model, cfg.n_experts, cfg.resolved_expert_mlp_dim
        self.n_experts, self.k = E, cfg.experts_per_token
        self.kind, self.norm_topk = cfg.router, cfg.router_norm_topk
        self.dispatch, self.capacity_factor = cfg.moe_dispatch, cfg.capacity_factor
        self.act, self.dtype = ACTIVATION_FNS[cfg.activation], dtype_of(cfg.dtype)
        self.router = dense(cfg, rngs, (D, E), (axes.EMBED, axes.EXPERTS))
        self.has_selection_bias = cfg.router_bias_update > 0
        if self.has_selection_bias:  # named SELECTION_BIAS
            # float32 whatever param_dtype: bfloat16 steps of 0.001 vanish once |bias| > 1/4.
            bias_E = jnp.zeros((E,), jnp.float32)
            self.selection_bias = nnx.Param(bias_E, axes=(axes.EXPERTS,))
        self.gate = dense(cfg, rngs, (E, D, F), (axes.EXPERTS, axes.EMBED, axes.MLP))
        self.up = dense(cfg, rngs, (E, D, F), (axes.EXPERTS, axes.EMBED, axes.MLP))
        self.down = dense(
            cfg, rngs, (E, F, D), (axes.EXPERTS, axes.MLP, axes.EMBED), depth_scaled=True
        )
        if cfg.shared_expert_dim:
            # Only the width changes: the config stays valid whatever MoE fields it also holds.
            self.shared = MLP(cfg.replace(mlp_dim=cfg.shared_expert_dim), rngs=rngs)
            if cfg.shared_expert_gate:
                # Qwen2-MoE's [D, 1] gate, held as a vector: one scalar per token, and not a
                # linear map that quantization or LoRA should pick up.
                self.shared_gate = dense(cfg, rngs, (D,), (axes.EMBED,))
        self.has_shared = bool(cfg.shared_expert_dim)
        self.has_shared_gate = cfg.shared_expert_gate

    def __call__(self, x_BTD, mask_BT):
        """``(out_BTD, stats)``; ``mask_BT`` marks real tokens (padding is left out of ``stats``)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        # Routing decisions are discrete: float32 logits keep a bfloat16 model's choices stable.
        logits_NE = project("ND,DE->NE", x_ND.astype(jnp.float32), self.router, jnp.float32)
        mask_N = mask_BT.reshape(-1)
        bias_E = self.selection_bias[...] if self.has_selection_bias else None
        weights_NR, experts_NR, probs_NE = route(
            logits_NE, self.k, self.kind, self.norm_topk, bias_E, mask_N
        )
        stats = router_stats(logits_NE, experts_NR, probs_NE, mask_N)
        ep = expert_parallel.plan((B, T)) if self.dispatch == "dropless" else None
        if ep is not None:
            R, dt = self.k, self.dtype
            out_BTD = expert_parallel.dispatch(
                self._grouped,
                x_BTD.astype(dt),
                weights_NR.reshape(B, T, R),
                experts_NR.reshape(B, T, R),
                *(w[...].astype(dt) for w in (self.gate, self.up, self.down)),
                ep,
            )
        else:
            if self.dispatch == "dropless":
                y_NRD = self._dropless(x_ND, experts_NR)
            else:
                y_NRD = self._capacity(x_ND, experts_NR)
            out_ND = jnp.einsum("NRD,NR->ND", y_NRD, weights_NR.astype(self.dtype))
            out_BTD = out_ND.reshape(B, T, D)
        if self.has_shared:
            shared_BTD = self.shared(x_BTD)
            if self.has_shared_gate:
                g_BT = project("BTD,D->BT", x_BTD, self.shared_gate, self.dtype)
                shared_BTD = jax.nn.sigmoid(g_BT)[..., None] * shared_BTD
            out_BTD = out_BTD + shared_BTD
        return out_BTD, stats

    def _experts(self, x, in_proj, out_proj):
        h = self.act(in_proj(x, self.gate)) * in_proj(x, self.up)
        return out_proj(h, self.down)

    def _grouped(self, x_AD, sizes_E, gate, up, down):
        # Rows past the last group (other devices' assignments under expert parallelism) get
        # no output.
        h_AF = self.act(jax.lax.ragged_dot(x_AD, gate, sizes_E))
        h_AF = h_AF * jax.lax.ragged_dot(x_AD, up, sizes_E)
        return jax.lax.ragged_dot(h_AF, down, sizes_E)

    def _dropless(self, x_ND, experts_NR):
        dt, (N, R) = self.dtype, experts_NR.shape
        order_A, _, sizes_E = _sort_by_expert(experts_NR, self.n_experts)
        x_AD = x_ND.astype(dt)[order_A // R]
        weights = (w[...].astype(dt) for w in (self.gate, self.up, self.down))
        y_AD = self._grouped(x_AD, sizes_E, *weights)
        return _unsort(y_AD, order_A).reshape(N, R, -1)

    def _capacity(self, x_ND, experts_NR):
        dt, (N, R), E = self.dtype, experts_NR.shape, self.n_experts
        M = max(1, math.ceil(self.capacity_factor * N * R / E))
        order_A, expert_A, sizes_E = _sort_by_expert(experts_NR, E)
        start_E = jnp.cumsum(sizes_E) - sizes_E
        rank_A = jnp.arange(N * R) - start_E[expert_A]
        # Assignments past an expert's capacity go to one spare row that is never computed.
        slot_A = jnp.where(rank_A < M, expert_A * M + rank_A, E * M)
        x_AD = x_ND.astype(dt)[order_A // R]
        D = x_AD.shape[-1]
        x_EMD = jnp.zeros((E * M + 1, D), dt).at[slot_A].set(x_AD)[: E * M].reshape(E, M, D)
        y_EMD = self._experts(
            x_EMD,
            lambda x, w: jnp.einsum("EMD,EDF->EMF", x, w[...].astype(dt)),
            lambda h, w: jnp.einsum("EMF,EFD->EMD", h, w[...].astype(dt)),
        )
        y_AD = jnp.concatenate([y_EMD.reshape(E * M, D), jnp.zeros((1, D), dt)])[slot_A]
        return _unsort(y_AD, order_A).reshape(N, R, D)
