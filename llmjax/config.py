"""The frozen configuration of a decoder-only transformer.

One ``ModelConfig`` describes every family llmjax assembles (GPT-2, Llama 3, Mistral, Qwen3, Gemma 2/3,
Mixtral, Qwen3-MoE): families differ only in field values. A config is validated when it is built, and every error names the
field and what would fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax.numpy as jnp

from llmjax.errors import ConfigError

NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITIONS = ("rope", "learned", "none")
ROPE_KINDS = ("default", "linear", "llama3", "yarn")
LAYER_KINDS = ("global", "local")
ATTENTION_IMPLS = ("xla", "cudnn", "pallas")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
ROUTERS = ("softmax", "sigmoid")
DISPATCHES = ("dropless", "capacity")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base ``theta`` and an optional context-extension scaling.

    ``kind`` is ``default`` (no scaling), ``linear`` (positions divided by ``factor``), ``llama3``
    (Llama 3.1 frequency-dependent scaling) or ``yarn`` (YaRN interpolation with attention factor).
    """

    theta: float = 10_000.0
    kind: str = "default"
    factor: float = 1.0
    # llama3 and yarn: the context length the model was pretrained on.
    original_max_len: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None means 0.1 * ln(factor) + 1
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    # Rotate only the first ``fraction`` of each head's channels (1.0 for every family here).
    fraction: float = 1.0

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ConfigError(f"rope.kind={self.kind!r}: expected one of {ROPE_KINDS}")
        if self.theta <= 0:
            raise ConfigError(f"rope.theta={self.theta}: must be positive")
        if self.kind != "default" and self.factor <= 0:
            raise ConfigError(f"rope.factor={self.factor}: must be positive for kind={self.kind!r}")
        if self.kind in ("llama3", "yarn") and not self.original_max_len:
            raise ConfigError(
                f"rope.kind={self.kind!r} needs rope.original_max_len (pretraining length)"
            )
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"rope.fraction={self.fraction}: must be in (0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Every architectural choice of the decoder-only transformer.

    Attention layers follow ``layer_pattern`` cyclically: ``"global"`` layers attend causally over the whole
    context, ``"local"`` layers within ``sliding_window`` tokens (query i sees keys j with 0 <= i - j < window).
    ``local_rope`` (if set) replaces ``rope`` on local layers, as Gemma 3 does.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: equal to n_heads (MHA); 1: MQA
    head_dim: int | None = None  # None: d_model // n_heads
    mlp_dim: int | None = None  # None: 4 * d_model
    max_seq_len: int = 2048
    name: str = "custom"

    # Normalisation.
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # scale by (1 + w), Gemma's RMSNorm
    post_norms: bool = False  # Gemma 2/3 "sandwich": also normalise each block's output
    qk_norm: bool = False  # RMSNorm over head channels of q and k (Qwen3, Gemma 3)

    # Biases.
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    # MLP.
    activation: str = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU: act(x W_gate) * (x W_up)

    # Positions.
    position: str = "rope"
    rope: RopeConfig = field(default_factory=RopeConfig)
    local_rope: RopeConfig | None = None

    # Attention.
    layer_pattern: tuple[str, ...] = ("global",)
    sliding_window: int | None = None
    query_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    attention_impl: str = "xla"

    # Embeddings.
    tie_embeddings: bool = True
    embed_scale: bool = False  # multiply token embeddings by sqrt(d_model) (Gemma)

    # Mixture of experts: n_experts = 0 keeps the dense MLP in every layer. Otherwise each layer not
    # in ``dense_layers`` routes every token to ``experts_per_token`` gated MLPs of width
    # ``expert_mlp_dim`` (see ``llmjax.layers.moe``).
    n_experts: int = 0
    experts_per_token: int = 2
    expert_mlp_dim: int | None = None  # None: mlp_dim
    router: str = "softmax"  # softmax over experts, then top-k; "sigmoid": per-expert scores
    router_norm_topk: bool = True  # rescale the k chosen weights to sum to 1 (Mixtral: yes)
    shared_expert_dim: int = 0  # width of an always-on gated MLP beside the experts (0: none)
    shared_expert_gate: bool = False  # scale the shared expert by sigmoid(x . w), w [D] (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()  # layers that keep the dense MLP of width mlp_dim
    router_aux_coef: float = 0.0  # weight of the load-balancing loss (next_token_loss adds it)
    router_z_coef: float = 0.0  # weight of the router z-loss
    # DeepSeek-V3's auxiliary-loss-free balancing: gamma, the step of a per-expert selection bias
    # (llmjax.layers.moe.route, llmjax.train.optim); 0: no bias.
    router_bias_update: float = 0.0
    moe_dispatch: str = "dropless"  # "capacity": at most capacity_factor * fair share per expert
    capacity_factor: float = 1.25

    # Numerics and memory.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls
    remat: str = "none"
    # Run repeating layers as one ``jax.lax.scan`` over parameters stacked along a leading
    # ``layers`` axis (``llmjax.models.scan``): compile time and program size stay flat in depth.
    # False: one unrolled block per layer (``params["layers"][i]``). Runs resume in either layout.
    scan_layers: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        def need(cond, fld, msg):
            if not cond:
                raise ConfigError(f"{fld}={getattr(self, fld)!r}: {msg}")

        for fld in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            need(
                isinstance(getattr(self, fld), int) and getattr(self, fld) > 0,
                fld,
                "must be a positive int",
            )
        need(
            self.n_kv_heads is None
            or (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0),
            "n_kv_heads",
            f"must divide n_heads={self.n_heads} (1 for MQA, n_heads for MHA)",
        )
        need(
            self.head_dim is not None or self.d_model % self.n_heads == 0,
            "head_dim",
            f"is None but d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set it",
        )
        need(self.head_dim is None or self.head_dim > 0, "head_dim", "must be positive")
        need(self.mlp_dim is None or self.mlp_dim > 0, "mlp_dim", "must be positive")
        need(self.norm in NORMS, "norm", f"expected one of {NORMS}")
        need(self.norm_eps > 0, "norm_eps", "must be positive")
        need(self.activation in ACTIVATIONS, "activation", f"expected one of {ACTIVATIONS}")
        need(self.position in POSITIONS, "position", f"expected one of {POSITIONS}")
        need(
            isinstance(self.layer_pattern, tuple)
            and len(self.layer_pattern) > 0
            and all(k in LAYER_KINDS for k in self.layer_pattern),
            "layer_pattern",
            f"must be a non-empty tuple of {LAYER_KINDS}",
        )
        if "local" in self.layer_kinds:
            need(
                self.sliding_window is not None and self.sliding_window > 0,
                "sliding_window",
                "layer_pattern has 'local' layers, so sliding_window must be a positive int",
            )
        need(
            self.sliding_window is None or self.sliding_window > 0,
            "sliding_window",
            "must be a positive int or None",
        )
        rot = self.resolved_head_dim * self.rope.fraction
        need(
            self.position != "rope" or (rot == int(rot) and int(rot) % 2 == 0),
            "head_dim",
            "rotary channels (head_dim * rope.fraction) must be an even integer",
        )
        for fld in ("attn_logit_softcap", "final_logit_softcap", "query_scale"):
            v = getattr(self, fld)
            need(v is None or v > 0, fld, "must be positive or None")
        need(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"expected one of {ATTENTION_IMPLS}",
        )
        need(self.param_dtype in DTYPES, "param_dtype", f"expected one of {DTYPES}")
        need(self.dtype in DTYPES, "dtype", f"expected one of {DTYPES}")
        need(self.remat in REMAT, "remat", f"expected one of {REMAT}")
        need(isinstance(self.scan_layers, bool), "scan_layers", "must be True or False")
        self._check_moe(need)

    def _check_moe(self, need):
        need(
            isinstance(self.n_experts, int) and self.n_experts >= 0,
            "n_experts",
            "must be an int >= 0 (0: a dense MLP in every layer)",
        )
        need(
            isinstance(self.dense_layers, tuple)
            and len(set(self.dense_layers)) == len(self.dense_layers)
            and all(isinstance(i, int) and 0 <= i < self.n_layers for i in self.dense_layers),
            "dense_layers",
            f"must be a tuple of distinct layer indices in [0, n_layers={self.n_layers})",
        )
        need(
            0 <= self.router_bias_update < float("inf"),
            "router_bias_update",
            "must be >= 0 and finite (0: no selection bias; DeepSeek-V3 used 0.001)",
        )
        need(
            self.n_experts or not self.router_bias_update,
            "router_bias_update",
            "balances the load of experts, and n_experts=0 means there are none; set n_experts "
            "> 0 or router_bias_update=0",
        )
        if not self.n_experts:
            return
        need(
            isinstance(self.experts_per_token, int)
            and 0 < self.experts_per_token <= self.n_experts,
            "experts_per_token",
            f"must be an int in [1, n_experts={self.n_experts}]",
        )
        need(
            self.expert_mlp_dim is None or self.expert_mlp_dim > 0,
            "expert_mlp_dim",
            "must be positive or None (None: mlp_dim)",
        )
        need(self.router in ROUTERS, "router", f"expected one of {ROUTERS}")
        need(self.shared_expert_dim >= 0, "shared_expert_dim", "must be >= 0 (0: no shared expert)")
        need(
            not self.shared_expert_gate or self.shared_expert_dim > 0,
            "shared_expert_gate",
            "gates the shared expert, and shared_expert_dim=0 means there is none; set "
            "shared_expert_dim > 0 or shared_expert_gate=False",
        )
        need(
            self.gated_mlp,
            "gated_mlp",
            "experts are gated MLPs; set gated_mlp=True for n_experts > 0",
        )
        need(
            not self.mlp_bias,
            "mlp_bias",
            "experts have no biases; set mlp_bias=False for n_experts > 0",
        )
        for fld in ("router_aux_coef", "router_z_coef"):
            need(getattr(self, fld) >= 0, fld, "must be >= 0 (0: not added to the loss)")
        need(self.moe_dispatch in DISPATCHES, "moe_dispatch", f"expected one of {DISPATCHES}")
        need(self.capacity_factor > 0, "capacity_factor", "must be positive")

    # Derived values --------------------------------------------------------------------------------
    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_mlp_dim(self) -> int:
        return self.mlp_dim or 4 * self.d_model

    @property
    def resolved_expert_mlp_dim(self) -> int:
        return self.expert_mlp_dim or self.resolved_mlp_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and i not in self.dense_layers

    @property
    def resolved_query_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.resolved_head_dim**-0.5

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        pattern = self.layer_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.n_layers))

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_kinds[i] == "local" else None

    def layer_rope(self, i: int) -> RopeConfig:
        if self.layer_kinds[i] == "local" and self.local_rope is not None:
            return self.local_rope
        return self.rope

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes``; unknown field names raise an error listing the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise ConfigError(
                f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(valid)}"
            )
        return dataclasses.replace(self, **changes)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), attention included.

        Matmul FLOPs only; causal attention counts half of the full T x S score matrix, and a
        mixture-of-experts layer the experts a token is routed to.
        """
        D, H, K, C = self.d_model, self.n_heads, self.resolved_kv_heads, self.resolved_head_dim
        F, V = self.resolved_mlp_dim, self.vocab_size
        proj = 2 * D * (H * C + 2 * K * C) + 2 * H * C * D
        dense_mlp = 2 * D * F * (3 if self.gated_mlp else 2)
        # A routed token runs its k experts (and the shared one) and every router logit.
        routed = (
            2
            * D
            * (
                3 * self.experts_per_token * self.resolved_expert_mlp_dim
                + 3 * self.shared_expert_dim
                + self.n_experts
            )
        )
        attn = mlp = 0.0
        for i in range(self.n_layers):
            mlp += routed if self.is_moe_layer(i) else dense_mlp
            w = self.layer_window(i)
            span = seq_len if w is None else min(w, seq_len)
            # Mean keys per query: T/2 when causal over all, w - w^2 / 2T within a window w.
            attn += 2 * 2 * H * C * (span / 2 if w is None else span - span * span / (2 * seq_len))
        return 3 * (self.n_layers * proj + mlp + attn + 2 * D * V)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def model_config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a ``ModelConfig`` saved with ``to_dict`` (nested rope configs, tuple fields)."""
    d = dict(d)
    # Configs saved before the field existed stored every layer unrolled.
    d.setdefault("scan_layers", False)
    for k in ("rope", "local_rope"):
        if isinstance(d.get(k), dict):
            d[k] = RopeConfig(**d[k])
    for f in dataclasses.fields(ModelConfig):
        if isinstance(d.get(f.name), list):
            d[f.name] = tuple(d[f.name])
    return ModelConfig(**d)
