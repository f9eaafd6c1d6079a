"""The tensor tables of Hugging Face checkpoints: which stored tensor holds which llmjax parameter.

Each architecture is a list of ``Tensor`` entries; loading, saving and the PEFT layout all read the
same table, so a name or a transpose is written down once.

Mixture-of-experts checkpoints come in two layouts. Published ones (and what ``save_pretrained``
writes by default) hold one matrix per expert: ``block_sparse_moe.experts.{e}.w1.weight`` (Mixtral)
or ``mlp.experts.{e}.gate_proj.weight`` (Qwen3-MoE, Qwen2-MoE), each entry filling expert ``e`` of
an llmjax ``[E, ...]`` parameter. transformers 5 keeps experts fused in memory
(``mlp.experts.gate_up_proj`` ``[E, 2F, D]``, ``mlp.experts.down_proj`` ``[E, D, F]``) and writes
that with ``save_original_format=False``; both are read, the per-expert one is written. Qwen2-MoE's
shared expert (``mlp.shared_expert.*``, ``mlp.shared_expert_gate``) is stored the same way in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmjax.config import ModelConfig


@dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the llmjax parameter paths it holds.

    layout ``linear``: stored ``[out, in]`` (torch Linear); ``conv``: stored ``[in, out]`` (GPT-2's
    Conv1D); ``flat``: a vector; ``same``: identical shape; ``experts``: stored ``[E, out, in]``
    for llmjax's ``[E, in, out]``. ``n_in`` leading llmjax dims are inputs. Several paths split the
    stored output dimension equally (GPT-2's fused q/k/v, fused expert gate and up).
    ``expert``: the tensor holds only expert ``expert`` of each path's ``[E, ...]`` parameter;
    shapes given to the layout functions are then those of one expert.
    """

    hf: str
    paths: tuple[str, ...]
    layout: str = "same"
    n_in: int = 1
    expert: int | None = None

    def part_shape(self, shape) -> tuple[int, ...]:
        """The shape this tensor fills of an llmjax parameter of ``shape``."""
        return tuple(shape[1:]) if self.expert is not None else tuple(shape)


def _shared_entries(cfg: ModelConfig, hf: str, us: str) -> list[Tensor]:
    """Qwen2-MoE's shared expert (a plain gated MLP) and its ``[1, D]`` gate, llmjax's ``[D]``."""
    if not cfg.shared_expert_dim:
        return []
    t = [
        Tensor(f"{hf}mlp.shared_expert.{n}_proj.weight", (f"{us}mlp.shared.{n}",), "linear")
        for n in ("gate", "up", "down")
    ]
    if cfg.shared_expert_gate:
        t.append(Tensor(hf + "mlp.shared_expert_gate.weight", (us + "mlp.shared_gate",), "linear"))
    return t


def _moe_entries(cfg: ModelConfig, arch: str, hf: str, us: str, fused: bool) -> list[Tensor]:
    gate, up, down, router = (us + f"mlp.{n}" for n in ("gate", "up", "down", "router"))
    if fused:
        return [
            Tensor(hf + "mlp.gate.weight", (router,), "linear"),
            Tensor(hf + "mlp.experts.gate_up_proj", (gate, up), "experts"),
            Tensor(hf + "mlp.experts.down_proj", (down,), "experts"),
            *_shared_entries(cfg, hf, us),
        ]
    if arch == "MixtralForCausalLM":
        moe, names = hf + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        moe, names = hf + "mlp.", ("gate_proj", "up_proj", "down_proj")
    t = [Tensor(moe + "gate.weight", (router,), "linear"), *_shared_entries(cfg, hf, us)]
    for e in range(cfg.n_experts):
        t += [
            Tensor(f"{moe}experts.{e}.{n}.weight", (p,), "linear", expert=e)
            for n, p in zip(names, (gate, up, down), strict=True)
        ]
    return t


def _decoder_table(cfg: ModelConfig, arch: str, fused: bool = False) -> list[Tensor]:
    gemma = arch.startswith("Gemma")
    t = [
        Tensor("model.embed_tokens.weight", ("embed",)),
        Tensor("model.norm.weight", ("final_norm.scale",)),
    ]
    if not cfg.tie_embeddings:
        t.append(Tensor("lm_head.weight", ("lm_head",), "linear"))
    for i in range(cfg.n_layers):
        hf, us = f"model.layers.{i}.", f"layers.{i}."
        t += [
            Tensor(hf + "self_attn.q_proj.weight", (us + "attn.wq",), "linear"),
            Tensor(hf + "self_attn.k_proj.weight", (us + "attn.wk",), "linear"),
            Tensor(hf + "self_attn.v_proj.weight", (us + "attn.wv",), "linear"),
            Tensor(hf + "self_attn.o_proj.weight", (us + "attn.wo",), "linear", n_in=2),
            Tensor(hf + "input_layernorm.weight", (us + "attn_norm.scale",)),
        ]
        if cfg.is_moe_layer(i):
            t += _moe_entries(cfg, arch, hf, us, fused)
        else:
            t += [
                Tensor(hf + "mlp.gate_proj.weight", (us + "mlp.gate",), "linear"),
                Tensor(hf + "mlp.up_proj.weight", (us + "mlp.up",), "linear"),
                Tensor(hf + "mlp.down_proj.weight", (us + "mlp.down",), "linear"),
            ]
        if gemma:
            t += [
                Tensor(hf + "post_attention_layernorm.weight", (us + "attn_post_norm.scale",)),
                Tensor(hf + "pre_feedforward_layernorm.weight", (us + "mlp_norm.scale",)),
                Tensor(hf + "post_feedforward_layernorm.weight", (us + "mlp_post_norm.scale",)),
            ]
        else:
            t.append(Tensor(hf + "post_attention_layernorm.weight", (us + "mlp_norm.scale",)))
        if cfg.qk_norm:
            t += [
                Tensor(hf + "self_attn.q_norm.weight", (us + "attn.q_norm.scale",)),
                Tensor(hf + "self_attn.k_norm.weight", (us + "attn.k_norm.scale",)),
            ]
        if cfg.qkv_bias:
            t += [
                Tensor(hf + f"self_attn.{n}_proj.bias", (us + f"attn.b{n}",), "flat") for n in "qkv"
            ]
        if cfg.out_bias:
            t.append(Tensor(hf + "self_attn.o_proj.bias", (us + "attn.bo",), "flat"))
        if cfg.mlp_bias:
            t += [
                Tensor(hf + "mlp.gate_proj.bias", (us + "mlp.gate_bias",), "flat"),
                Tensor(hf + "mlp.up_proj.bias", (us + "mlp.up_bias",), "flat"),
                Tensor(hf + "mlp.down_proj.bias", (us + "mlp.down_bias",), "flat"),
            ]
    return t


def _gpt2_table(cfg: ModelConfig, prefix: str) -> list[Tensor]:
    p = prefix
    t = [
        Tensor(p + "wte.weight", ("embed",)),
        Tensor(p + "wpe.weight", ("pos_embed",)),
        Tensor(p + "ln_f.weight", ("final_norm.scale",)),
        Tensor(p + "ln_f.bias", ("final_norm.bias",)),
    ]
    if not cfg.tie_embeddings:
        t.append(Tensor("lm_head.weight", ("lm_head",), "linear"))
    for i in range(cfg.n_layers):
        hf, us = f"{p}h.{i}.", f"layers.{i}."
        qkv = tuple(us + f"attn.w{n}" for n in "qkv")
        t += [
            Tensor(hf + "ln_1.weight", (us + "attn_norm.scale",)),
            Tensor(hf + "ln_1.bias", (us + "attn_norm.bias",)),
            Tensor(hf + "attn.c_attn.weight", qkv, "conv"),
            Tensor(hf + "attn.c_attn.bias", tuple(us + f"attn.b{n}" for n in "qkv"), "flat"),
            Tensor(hf + "attn.c_proj.weight", (us + "attn.wo",), "conv", n_in=2),
            Tensor(hf + "attn.c_proj.bias", (us + "attn.bo",), "flat"),
            Tensor(hf + "ln_2.weight", (us + "mlp_norm.scale",)),
            Tensor(hf + "ln_2.bias", (us + "mlp_norm.bias",)),
            Tensor(hf + "mlp.c_fc.weight", (us + "mlp.up",), "conv"),
            Tensor(hf + "mlp.c_fc.bias", (us + "mlp.up_bias",), "flat"),
            Tensor(hf + "mlp.c_proj.weight", (us + "mlp.down",), "conv"),
            Tensor(hf + "mlp.c_proj.bias", (us + "mlp.down_bias",), "flat"),
        ]
    return t


def tensor_table(
    cfg: ModelConfig, arch: str, prefix: str = "transformer.", fused_experts: bool = False
) -> list[Tensor]:
    """The table of ``arch``; ``fused_experts`` picks transformers 5's in-memory expert layout."""
    if arch == "GPT2LMHeadModel":
        return _gpt2_table(cfg, prefix)
    return _decoder_table(cfg, arch, fused_experts)


def _is_ignorable(name: str, cfg: ModelConfig) -> bool:
    # Causal-mask buffers of old GPT-2 checkpoints, rotary caches, and a tied head saved anyway.
    return name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")) or (
        cfg.tie_embeddings and name == "lm_head.weight"
    )


# Shapes ----------------------------------------------------------------------------------------------
def _split(shape, n_in):
    return int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))


def hf_shape(entry: Tensor, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    if entry.layout == "same":
        return shapes[0]
    if entry.layout == "flat":
        return (sum(int(np.prod(s)) for s in shapes),)
    if entry.layout == "experts":
        return (shapes[0][0], sum(s[2] for s in shapes), shapes[0][1])
    n_in = _split(shapes[0], entry.n_in)[0]
    n_out = sum(_split(s, entry.n_in)[1] for s in shapes)
    return (n_out, n_in) if entry.layout == "linear" else (n_in, n_out)


def to_llmjax(entry: Tensor, arr: np.ndarray, shapes) -> list[np.ndarray]:
    if entry.layout in ("same", "flat"):
        parts = np.split(arr.reshape(-1), len(shapes)) if entry.layout == "flat" else [arr]
        return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]
    if entry.layout == "experts":
        parts = np.split(np.swapaxes(arr, 1, 2), len(shapes), axis=2)  # now [E, in, out]
        return [np.ascontiguousarray(p) for p in parts]
    w = arr.T if entry.layout == "linear" else arr  # now [in, out]
    parts = np.split(w, len(shapes), axis=1)
    return [np.ascontiguousarray(p).reshape(s) for p, s in zip(parts, shapes, strict=True)]


def to_hf_tensor(entry: Tensor, arrays: list[np.ndarray]) -> np.ndarray:
    if entry.layout == "same":
        return arrays[0]
    if entry.layout == "flat":
        return np.concatenate([a.reshape(-1) for a in arrays])
    if entry.layout == "experts":
        return np.ascontiguousarray(np.swapaxes(np.concatenate(arrays, axis=2), 1, 2))
    w = np.concatenate([a.reshape(_split(a.shape, entry.n_in)) for a in arrays], axis=1)
    return np.ascontiguousarray(w.T if entry.layout == "linear" else w)
