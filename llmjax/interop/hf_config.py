"""Hugging Face ``config.json`` <-> ``ModelConfig`` for each supported architecture.

Both the older key layout (``rope_theta`` + ``rope_scaling``) that most published checkpoints use and
the newer ``rope_parameters`` layout are read; the older one is written, since every version of
``transformers`` reads it.
"""

from __future__ import annotations

import dataclasses

from llmjax.config import ModelConfig, RopeConfig
from llmjax.errors import HFCheckpointError, LlmjaxError

ARCHITECTURES = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
)
MODEL_TYPES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# Sequence classifiers (reward models, critics): a causal LM's decoder with a ``score`` head.
CLASSIFIERS = {
    "GPT2ForSequenceClassification": "GPT2LMHeadModel",
    "LlamaForSequenceClassification": "LlamaForCausalLM",
    "MistralForSequenceClassification": "MistralForCausalLM",
    "Qwen3ForSequenceClassification": "Qwen3ForCausalLM",
    "Gemma2ForSequenceClassification": "Gemma2ForCausalLM",
    "Gemma3TextForSequenceClassification": "Gemma3ForCausalLM",
}
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_HF_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}
_LAYER_TYPES = {"sliding_attention": "local", "full_attention": "global"}


class UnsupportedConfig(LlmjaxError, ValueError):
    """A Hugging Face config that llmjax cannot represent exactly."""


def _need(d: dict, key: str, where: str = "", kind=int):
    """``d[key]``, which the config must hold (a positive int unless ``kind`` says otherwise)."""
    name = f"{where}.{key}" if where else key
    if key not in d or d[key] is None:
        raise HFCheckpointError(
            f"the required field {name!r} is missing; add the model's value to config.json"
        )
    value = d[key]
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        what = "a positive integer" if kind is int else "a number"
        raise HFCheckpointError(
            f"the field {name!r} is {value!r}, not {what}; correct it in config.json"
        )
    return value


def architecture_of(hf: dict) -> str:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    by_type = {v: k for k, v in MODEL_TYPES.items()}
    if not archs and hf.get("model_type") in by_type:
        return by_type[hf["model_type"]]
    scorers = [a for a in archs if a in CLASSIFIERS]
    if scorers:
        raise UnsupportedConfig(
            f"{scorers[0]} is a sequence classifier (a score head, no lm_head); load it with "
            "llmjax.interop.hf_score.from_hf_scorer"
        )
    raise UnsupportedConfig(
        f"unsupported architecture {archs or hf.get('model_type')!r}; llmjax reads {list(ARCHITECTURES)}"
    )


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedConfig(f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _rope_from(params: dict | None, theta: float | None) -> RopeConfig:
    params = dict(params or {})
    theta = params.get("rope_theta", theta if theta is not None else 10_000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear", "llama3", "yarn"):
        raise UnsupportedConfig(
            f"unsupported RoPE scaling {kind!r}; llmjax implements default, linear, llama3 and yarn"
        )
    kw = {"theta": float(theta), "kind": kind, "fraction": params.get("partial_rotary_factor", 1.0)}
    if kind != "default":
        kw["factor"] = float(_need(params, "factor", "rope_scaling", float))
    if kind in ("llama3", "yarn"):
        kw["original_max_len"] = _need(params, "original_max_position_embeddings", "rope_scaling")
    if kind == "llama3":
        kw["low_freq_factor"] = float(_need(params, "low_freq_factor", "rope_scaling", float))
        kw["high_freq_factor"] = float(_need(params, "high_freq_factor", "rope_scaling", float))
    if kind == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise UnsupportedConfig(
                "YaRN with mscale/mscale_all_dim (DeepSeek style) is not supported"
            )
        kw.update(
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )
    return RopeConfig(**kw)


def _ropes(hf: dict) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope or None) from either key layout."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        glob = _rope_from(rp["full_attention"], None)
        local = _rope_from(rp["sliding_attention"], None) if "sliding_attention" in rp else None
        return glob, local
    if isinstance(rp, dict) and rp:
        return _rope_from(rp, hf.get("rope_theta")), None
    glob = _rope_from(hf.get("rope_scaling"), hf.get("rope_theta"))
    local = None
    if "rope_local_base_freq" in hf:
        local = RopeConfig(theta=float(hf["rope_local_base_freq"]))
    return glob, local


def _layer_pattern(hf: dict, arch: str, n_layers: int) -> tuple[str, ...]:
    if arch == "Qwen2MoeForCausalLM" and not (
        hf.get("use_sliding_window") and hf.get("sliding_window")
    ):  # transformers sets the window to 0 unless use_sliding_window, whatever layer_types say
        return ("global",)
    if hf.get("layer_types"):
        types = hf["layer_types"]
        unknown = set(types) - set(_LAYER_TYPES)
        if unknown:
            raise UnsupportedConfig(f"unsupported layer_types {sorted(unknown)}")
        return tuple(_LAYER_TYPES[t] for t in types[:n_layers])
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return ("local",) if hf.get("sliding_window") else ("global",)
    if arch == "Qwen3MoeForCausalLM":  # one window for every layer when it is on
        return (
            ("local",) if hf.get("use_sliding_window") and hf.get("sliding_window") else ("global",)
        )
    if arch == "Qwen2MoeForCausalLM":  # transformers' rule: even layers below max_window_layers
        first = hf.get("max_window_layers", 28)
        return tuple("local" if i % 2 == 0 and i < first else "global" for i in range(n_layers))
    if arch == "Gemma2ForCausalLM":
        return ("local", "global")
    if arch == "Gemma3ForCausalLM":
        period = hf.get("sliding_window_pattern", 6)
        return ("local",) * (period - 1) + ("global",)
    if arch == "Qwen3ForCausalLM" and hf.get("use_sliding_window"):
        first = hf.get("max_window_layers", n_layers)
        return tuple("local" if i >= first else "global" for i in range(n_layers))
    return ("global",)


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """The ``ModelConfig`` equivalent to a Hugging Face config dict."""
    arch = architecture_of(hf)
    if arch == "GPT2LMHeadModel":
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise UnsupportedConfig(
                "GPT-2 with scale_attn_by_inverse_layer_idx or without "
                "scale_attn_weights is not supported"
            )
        d = _need(hf, "n_embd")
        cfg = dict(
            vocab_size=_need(hf, "vocab_size"),
            d_model=d,
            n_layers=_need(hf, "n_layer"),
            n_heads=_need(hf, "n_head"),
            mlp_dim=hf.get("n_inner") or 4 * d,
            max_seq_len=_need(hf, "n_positions"),
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position="learned",
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            gated_mlp=False,
            activation=_activation(hf.get("activation_function", "gelu_new")),
            tie_embeddings=hf.get("tie_word_embeddings", True),
        )
        return ModelConfig(name=hf.get("_name_or_path") or "gpt2", **{**cfg, **overrides})

    n_layers, n_heads = _need(hf, "num_hidden_layers"), _need(hf, "num_attention_heads")
    head_dim = hf.get("head_dim") or _need(hf, "hidden_size") // n_heads
    rope, local_rope = _ropes(hf)
    pattern = _layer_pattern(hf, arch, n_layers)
    gemma = arch.startswith("Gemma")
    cfg = dict(
        vocab_size=_need(hf, "vocab_size"),
        d_model=_need(hf, "hidden_size"),
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        mlp_dim=_need(hf, "intermediate_size"),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope,
        layer_pattern=pattern,
        sliding_window=hf.get("sliding_window") if "local" in pattern else None,
        activation=_activation(hf.get("hidden_activation") or hf.get("hidden_act") or "silu"),
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=hf.get("tie_word_embeddings", gemma),
        qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"),
    )
    cfg.update(_experts_from(hf, arch, n_layers))
    if arch == "Qwen2MoeForCausalLM":  # biases on q, k and v only, on unless qkv_bias says no
        cfg.update(qkv_bias=bool(hf.get("qkv_bias", True)), out_bias=False)
    if gemma:
        cfg.update(
            norm_unit_offset=True,
            post_norms=True,
            embed_scale=True,
            query_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
        )
        if arch == "Gemma3ForCausalLM":
            cfg["local_rope"] = local_rope or RopeConfig(theta=10_000.0)
    return ModelConfig(name=hf.get("_name_or_path") or MODEL_TYPES[arch], **{**cfg, **overrides})


def _experts_from(hf: dict, arch: str, n_layers: int) -> dict:
    """The mixture-of-experts fields of a Mixtral, Qwen3-MoE or Qwen2-MoE config (none for others)."""
    if arch == "MixtralForCausalLM":
        return dict(
            n_experts=_need(hf, "num_local_experts"),
            experts_per_token=_need(hf, "num_experts_per_tok"),
            expert_mlp_dim=_need(hf, "intermediate_size"),
            router_norm_topk=True,
            router_aux_coef=float(hf.get("router_aux_loss_coef", 0.0)),
        )
    if arch not in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        return {}
    # transformers writes num_experts under its attribute-map name, published configs do not.
    key = "num_experts" if hf.get("num_experts") is not None else "num_local_experts"
    n_experts = hf.get(key) or 0
    if not n_experts:
        return {}
    step = _need(hf, "decoder_sparse_step") if "decoder_sparse_step" in hf else 1
    dense = set(hf.get("mlp_only_layers") or [])
    out = dict(
        n_experts=_need(hf, key),
        experts_per_token=_need(hf, "num_experts_per_tok"),
        expert_mlp_dim=_need(hf, "moe_intermediate_size"),
        router_norm_topk=bool(hf.get("norm_topk_prob", False)),
        dense_layers=tuple(i for i in range(n_layers) if i in dense or (i + 1) % step),
        router_aux_coef=float(hf.get("router_aux_loss_coef", 0.0)),
    )
    if arch == "Qwen2MoeForCausalLM":  # every MoE layer also runs a sigmoid-gated shared expert
        out.update(
            shared_expert_dim=_need(hf, "shared_expert_intermediate_size"),
            shared_expert_gate=True,
        )
    return out


def _experts_to(cfg: ModelConfig, arch: str) -> dict:
    if arch == "MixtralForCausalLM":
        return dict(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.experts_per_token,
            intermediate_size=cfg.resolved_expert_mlp_dim,
            router_aux_loss_coef=cfg.router_aux_coef,
        )
    out = dict(
        num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.experts_per_token,
        moe_intermediate_size=cfg.resolved_expert_mlp_dim,
        norm_topk_prob=cfg.router_norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=list(cfg.dense_layers),
        router_aux_loss_coef=cfg.router_aux_coef,
    )
    if arch == "Qwen2MoeForCausalLM":
        if not cfg.shared_expert_dim:
            raise UnsupportedConfig(
                "Qwen2MoeForCausalLM has a gated shared expert in every MoE layer; set "
                "shared_expert_dim and shared_expert_gate=True, or export as Qwen3MoeForCausalLM"
            )
        out["shared_expert_intermediate_size"] = cfg.shared_expert_dim
    return out


def default_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture a config most naturally exports to."""
    if cfg.n_experts:
        if cfg.shared_expert_dim:
            return "Qwen2MoeForCausalLM"
        return "Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"
    if cfg.position == "learned":
        return "GPT2LMHeadModel"
    if cfg.post_norms:
        return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if "local" in cfg.layer_kinds:
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def _rope_to(rope: RopeConfig) -> dict | None:
    if rope.kind == "default":
        return None
    out = {"rope_type": rope.kind, "factor": rope.factor}
    if rope.kind in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_len
    if rope.kind == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.kind == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    return out


def _integral(x: float) -> int | float:
    return round(x) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


def config_to_hf(cfg: ModelConfig, arch: str | None = None) -> dict:
    """A Hugging Face config dict for ``cfg``; raises if ``arch`` cannot express it exactly."""
    arch = arch or default_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise UnsupportedConfig(
            f"unsupported architecture {arch!r}; choose from {list(ARCHITECTURES)}"
        )
    torch_dtype = cfg.param_dtype
    if arch == "GPT2LMHeadModel":
        hf = dict(
            vocab_size=cfg.vocab_size,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.resolved_mlp_dim,
            n_positions=cfg.max_seq_len,
            n_ctx=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new" if cfg.activation == "gelu_tanh" else cfg.activation,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    else:
        kinds = cfg.layer_kinds
        hf = dict(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.resolved_kv_heads,
            head_dim=cfg.resolved_head_dim,
            intermediate_size=cfg.resolved_mlp_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope.theta,
            rope_scaling=_rope_to(cfg.rope),
            hidden_act=_HF_ACTIVATIONS[cfg.activation],
            attention_bias=cfg.qkv_bias,
            tie_word_embeddings=cfg.tie_embeddings,
        )
        if arch == "LlamaForCausalLM":
            hf["mlp_bias"] = cfg.mlp_bias
        if "local" in kinds:
            hf["sliding_window"] = cfg.sliding_window
        elif arch in ("MistralForCausalLM", "MixtralForCausalLM"):
            hf["sliding_window"] = None
        if arch in ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            hf.update(_experts_to(cfg, arch))
        if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            hf["use_sliding_window"] = "local" in kinds
        if arch == "Qwen2MoeForCausalLM":
            hf["qkv_bias"] = hf.pop("attention_bias")
            hf["layer_types"] = [
                "sliding_attention" if k == "local" else "full_attention" for k in kinds
            ]
        if arch in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            hf["layer_types"] = [
                "sliding_attention" if k == "local" else "full_attention" for k in kinds
            ]
            if arch == "Qwen3ForCausalLM":
                hf["use_sliding_window"] = "local" in kinds
                hf["max_window_layers"] = kinds.index("local") if "local" in kinds else cfg.n_layers
        if arch.startswith("Gemma"):
            hf.update(
                hidden_activation=hf.pop("hidden_act"),
                query_pre_attn_scalar=_integral(cfg.resolved_query_scale**-2),
                attn_logit_softcapping=cfg.attn_logit_softcap,
                final_logit_softcapping=cfg.final_logit_softcap,
            )
        if arch == "Gemma3ForCausalLM":
            local = cfg.local_rope or cfg.rope
            if local.kind != "default":
                raise UnsupportedConfig("Gemma3ForCausalLM has no RoPE scaling on local layers")
            hf["rope_local_base_freq"] = local.theta
    hf.update(
        architectures=[arch],
        model_type=MODEL_TYPES[arch],
        torch_dtype=torch_dtype,
        dtype=torch_dtype,
    )
    _check_round_trip(cfg, hf, arch)
    return hf


# Fields that describe how a model runs or trains, not what it computes (a capacity-limited
# dispatch is a training choice: the export computes every expert, as transformers does).
_RUNTIME_FIELDS = (
    "name",
    "param_dtype",
    "dtype",
    "attention_impl",
    "remat",
    "scan_layers",
    "init_std",
    "router_z_coef",
    "moe_dispatch",
    "capacity_factor",
)
_MOE_FIELDS = (
    "n_experts",
    "experts_per_token",
    "expert_mlp_dim",
    "router",
    "router_norm_topk",
    "shared_expert_dim",
    "shared_expert_gate",
    "dense_layers",
    "router_aux_coef",
)


def _effective(cfg: ModelConfig) -> dict:
    """What a config computes, with defaults resolved (None head_dim and its explicit value agree)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    for f in _RUNTIME_FIELDS:
        out.pop(f)
    out.update(
        n_kv_heads=cfg.resolved_kv_heads,
        head_dim=cfg.resolved_head_dim,
        mlp_dim=cfg.resolved_mlp_dim,
        query_scale=round(cfg.resolved_query_scale, 12),
        layer_pattern=cfg.layer_kinds,
        local_rope=tuple(cfg.layer_rope(i) for i in range(cfg.n_layers)),
        rope=None,  # covered per layer by local_rope
    )
    if "local" not in cfg.layer_kinds:
        out["sliding_window"] = None
    if not cfg.n_experts:
        out.update(dict.fromkeys(_MOE_FIELDS))
    else:
        out["expert_mlp_dim"] = cfg.resolved_expert_mlp_dim
        if not cfg.dense_layers:  # no layer has the dense MLP: its width means nothing
            out["mlp_dim"] = None
    return out


def _check_round_trip(cfg: ModelConfig, hf: dict, arch: str):
    ours, back = _effective(cfg), _effective(config_from_hf(hf))
    diffs = [f"{k}: {ours[k]!r} (exported as {back[k]!r})" for k in ours if ours[k] != back[k]]
    if diffs:
        raise UnsupportedConfig(f"this config cannot be expressed as {arch}: " + "; ".join(diffs))
