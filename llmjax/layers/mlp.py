"""The feed-forward block: plain (GELU) or gated (SwiGLU / GeGLU)."""

from __future__ import annotations

import jax
from flax import nnx

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.layers.params import dense, project, zeros

ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.resolved_mlp_dim
        self.gated, self.act = cfg.gated_mlp, ACTIVATION_FNS[cfg.activation]
        self.dtype = dtype_of(cfg.dtype)
        if self.gated:
            self.gate = dense(cfg, rngs, (D, F), (axes.EMBED, axes.MLP))
        self.up = dense(cfg, rngs, (D, F), (axes.EMBED, axes.MLP))
        self.down = dense(cfg, rngs, (F, D), (axes.MLP, axes.EMBED), depth_scaled=True)
        if cfg.mlp_bias:
            if self.gated:
                self.gate_bias = zeros(cfg, (F,), (axes.MLP,))
            self.up_bias = zeros(cfg, (F,), (axes.MLP,))
            self.down_bias = zeros(cfg, (D,), (axes.EMBED,))
        self.bias = cfg.mlp_bias

    def __call__(self, x_BTD):
        dt = self.dtype
        h_BTF = project("BTD,DF->BTF", x_BTD, self.up, dt)
        if self.bias:
            h_BTF = h_BTF + self.up_bias[...].astype(dt)
        if self.gated:
            g_BTF = project("BTD,DF->BTF", x_BTD, self.gate, dt)
            if self.bias:
                g_BTF = g_BTF + self.gate_bias[...].astype(dt)
            h_BTF = self.act(g_BTF) * h_BTF
        else:
            h_BTF = self.act(h_BTF)
        h_BTF = axes.constrain(h_BTF, (axes.ACT_BATCH, axes.ACT_LENGTH, axes.ACT_MLP))
        out_BTD = project("BTF,FD->BTD", h_BTF, self.down, dt)
        if self.bias:
            out_BTD = out_BTD + self.down_bias[...].astype(dt)
        return out_BTD
