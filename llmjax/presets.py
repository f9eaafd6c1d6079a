"""Named model presets: published full-size architectures and tiny variants for tests and examples.

Each full-size preset reproduces the published architecture exactly (its parameter count is tested);
each ``-tiny`` preset keeps every architectural feature of its family at a size that runs on a laptop.
"""

from __future__ import annotations

from llmjax.config import ModelConfig, RopeConfig
from llmjax.errors import UnknownName

_LLAMA3_ROPE = dict(kind="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)


def gpt2(name, d_model, n_layers, n_heads, **kw):
    base = dict(
        vocab_size=50257,
        mlp_dim=4 * d_model,
        max_seq_len=1024,
        norm="layernorm",
        norm_eps=1e-5,
        position="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        activation="gelu_tanh",
        gated_mlp=False,
        tie_embeddings=True,
    )
    return ModelConfig(
        name=name, d_model=d_model, n_layers=n_layers, n_heads=n_heads, **{**base, **kw}
    )


def llama3(name, **kw):
    base = dict(
        vocab_size=128256, norm_eps=1e-5, activation="silu", gated_mlp=True, tie_embeddings=False
    )
    return ModelConfig(name=name, **{**base, **kw})


def mistral(name, **kw):
    base = dict(
        vocab_size=32000,
        norm_eps=1e-5,
        activation="silu",
        gated_mlp=True,
        tie_embeddings=False,
        layer_pattern=("local",),
        rope=RopeConfig(theta=10_000.0),
    )
    return ModelConfig(name=name, **{**base, **kw})


def qwen3(name, **kw):
    base = dict(
        vocab_size=151936,
        norm_eps=1e-6,
        qk_norm=True,
        activation="silu",
        gated_mlp=True,
        rope=RopeConfig(theta=1_000_000.0),
    )
    return ModelConfig(name=name, **{**base, **kw})


def mixtral(name, **kw):
    """Mistral's decoder with every MLP replaced by 8 experts, 2 per token (softmax, renormalised)."""
    base = dict(
        vocab_size=32000,
        norm_eps=1e-5,
        activation="silu",
        gated_mlp=True,
        tie_embeddings=False,
        rope=RopeConfig(theta=1_000_000.0),
        n_experts=8,
        experts_per_token=2,
        router_norm_topk=True,
        router_aux_coef=0.02,
    )
    return ModelConfig(name=name, **{**base, **kw})


# What Qwen's mixture-of-experts decoders share.
_QWEN_MOE = dict(
    vocab_size=151936,
    norm_eps=1e-6,
    activation="silu",
    gated_mlp=True,
    tie_embeddings=False,
    rope=RopeConfig(theta=1_000_000.0),
    router_aux_coef=0.001,
)


def qwen3_moe(name, **kw):
    """Qwen3's decoder with routed experts; ``dense_layers`` keep a dense MLP of ``mlp_dim``."""
    base = dict(_QWEN_MOE, qk_norm=True, router_norm_topk=True)
    return ModelConfig(name=name, **{**base, **kw})


def qwen2_moe(name, **kw):
    """Qwen2's decoder (q/k/v biases, no q/k norms) with routed experts beside a shared expert.

    Every MoE layer adds ``sigmoid(x . shared_gate)`` times a gated MLP of width
    ``shared_expert_dim`` to the routed experts' output; routing weights are not renormalised.
    """
    base = dict(_QWEN_MOE, qkv_bias=True, router_norm_topk=False, shared_expert_gate=True)
    return ModelConfig(name=name, **{**base, **kw})


def gemma(name, **kw):
    """Gemma 2 and 3 share RMSNorm(1 + w), sandwich norms, GeGLU and scaled embeddings."""
    base = dict(
        norm_eps=1e-6,
        norm_unit_offset=True,
        post_norms=True,
        activation="gelu_tanh",
        gated_mlp=True,
        embed_scale=True,
        tie_embeddings=True,
    )
    return ModelConfig(name=name, **{**base, **kw})


def gemma2(name, **kw):
    base = dict(
        vocab_size=256000,
        layer_pattern=("local", "global"),
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        max_seq_len=8192,
    )
    return gemma(name, **{**base, **kw})


def gemma3(name, *, rope_factor=None, **kw):
    rope = RopeConfig(theta=1_000_000.0)
    if rope_factor:
        rope = RopeConfig(theta=1_000_000.0, kind="linear", factor=rope_factor)
    base = dict(
        vocab_size=262144,
        qk_norm=True,
        layer_pattern=("local",) * 5 + ("global",),
        rope=rope,
        local_rope=RopeConfig(theta=10_000.0),
    )
    return gemma(name, **{**base, **kw})


PRESETS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        gpt2("gpt2-124m", 768, 12, 12),
        gpt2("gpt2-355m", 1024, 24, 16),
        gpt2("gpt2-tiny", 64, 2, 4, max_seq_len=128, vocab_size=512),
        llama3(
            "llama3.2-1b",
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            head_dim=64,
            mlp_dim=8192,
            max_seq_len=131072,
            tie_embeddings=True,
            rope=RopeConfig(theta=500_000.0, factor=32.0, **_LLAMA3_ROPE),
        ),
        llama3(
            "llama3.1-8b",
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            mlp_dim=14336,
            max_seq_len=131072,
            rope=RopeConfig(theta=500_000.0, factor=8.0, **_LLAMA3_ROPE),
        ),
        llama3(
            "llama3-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_dim=128,
            max_seq_len=256,
            rope=RopeConfig(theta=500_000.0, factor=8.0, kind="llama3", original_max_len=64),
        ),
        mistral(
            "mistral-7b",
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            mlp_dim=14336,
            max_seq_len=32768,
            sliding_window=4096,
        ),
        mistral(
            "mistral-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_dim=128,
            max_seq_len=256,
            sliding_window=16,
        ),
        qwen3(
            "qwen3-0.6b",
            d_model=1024,
            n_layers=28,
            n_heads=16,
            n_kv_heads=8,
            head_dim=128,
            mlp_dim=3072,
            max_seq_len=40960,
            tie_embeddings=True,
        ),
        qwen3(
            "qwen3-8b",
            d_model=4096,
            n_layers=36,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            mlp_dim=12288,
            max_seq_len=40960,
            tie_embeddings=False,
        ),
        qwen3(
            "qwen3-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            mlp_dim=128,
            max_seq_len=256,
            tie_embeddings=True,
        ),
        gemma2(
            "gemma2-2b",
            d_model=2304,
            n_layers=26,
            n_heads=8,
            n_kv_heads=4,
            head_dim=256,
            mlp_dim=9216,
            sliding_window=4096,
            query_scale=256**-0.5,
        ),
        gemma2(
            "gemma2-9b",
            d_model=3584,
            n_layers=42,
            n_heads=16,
            n_kv_heads=8,
            head_dim=256,
            mlp_dim=14336,
            sliding_window=4096,
            query_scale=256**-0.5,
        ),
        gemma2(
            "gemma2-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            mlp_dim=128,
            max_seq_len=256,
            sliding_window=16,
            query_scale=24**-0.5,
        ),
        gemma3(
            "gemma3-1b",
            d_model=1152,
            n_layers=26,
            n_heads=4,
            n_kv_heads=1,
            head_dim=256,
            mlp_dim=6912,
            max_seq_len=32768,
            sliding_window=512,
            query_scale=256**-0.5,
        ),
        gemma3(
            "gemma3-4b",
            vocab_size=262208,
            d_model=2560,
            n_layers=34,
            n_heads=8,
            n_kv_heads=4,
            head_dim=256,
            mlp_dim=10240,
            max_seq_len=131072,
            sliding_window=1024,
            query_scale=256**-0.5,
            rope_factor=8.0,
        ),
        gemma3(
            "gemma3-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=6,
            n_heads=4,
            n_kv_heads=1,
            head_dim=32,
            mlp_dim=128,
            max_seq_len=256,
            sliding_window=16,
            query_scale=32**-0.5,
            rope_factor=8.0,
        ),
        mixtral(
            "mixtral-8x7b",
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            mlp_dim=14336,
            max_seq_len=32768,
        ),
        mixtral(
            "mixtral-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            mlp_dim=96,
            max_seq_len=256,
            n_experts=4,
        ),
        qwen3_moe(
            "qwen3-30b-a3b",
            d_model=2048,
            n_layers=48,
            n_heads=32,
            n_kv_heads=4,
            head_dim=128,
            mlp_dim=6144,
            max_seq_len=40960,
            n_experts=128,
            experts_per_token=8,
            expert_mlp_dim=768,
        ),
        qwen3_moe(
            "qwen3-moe-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=3,
            n_heads=4,
            n_kv_heads=2,
            head_dim=32,
            mlp_dim=128,
            max_seq_len=256,
            n_experts=8,
            experts_per_token=2,
            expert_mlp_dim=32,
            dense_layers=(1,),
        ),
        qwen2_moe(
            "qwen1.5-moe-a2.7b",
            d_model=2048,
            n_layers=24,
            n_heads=16,
            n_kv_heads=16,
            mlp_dim=5632,
            max_seq_len=32768,
            n_experts=60,
            experts_per_token=4,
            expert_mlp_dim=1408,
            shared_expert_dim=5632,
        ),
        qwen2_moe(
            "qwen2-moe-tiny",
            vocab_size=512,
            d_model=64,
            n_layers=3,
            n_heads=4,
            n_kv_heads=2,
            mlp_dim=128,
            max_seq_len=256,
            n_experts=8,
            experts_per_token=2,
            expert_mlp_dim=32,
            shared_expert_dim=64,
            dense_layers=(1,),
        ),
    ]
}


# Short names people use for the same published models.
ALIASES = {"llama3-8b": "llama3.1-8b", "llama3-1b": "llama3.2-1b", "gpt2": "gpt2-124m"}


def get(name: str) -> ModelConfig:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise UnknownName(
            f"unknown preset {name!r}; available presets: {sorted(PRESETS)} "
            f"(aliases: {sorted(ALIASES)})"
        )
    return PRESETS[name]
