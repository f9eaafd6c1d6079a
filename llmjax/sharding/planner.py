"""A memory planner: bytes per device for a preset, mesh, batch, sequence length, dtype and remat.

Parameters, gradients and optimizer state are exact (shapes and the rule table's shardings).
Activations follow a per-token model of what the backward pass keeps alive under each remat policy;
``tests/sharding/test_planner.py`` checks the totals against XLA's compiled memory analysis. The
output layer counts the chunked cross-entropy's buffers (``llmjax.losses.chunked``) that the
training losses use, or with ``ce_chunk=0`` the full float32 logits and their gradient.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from jax.sharding import AbstractMesh

from llmjax import axes
from llmjax.config import ConfigError, ModelConfig, dtype_of
from llmjax.losses.chunked import DEFAULT_CHUNK
from llmjax.models.model import Model
from llmjax.sharding.mesh import MeshConfig
from llmjax.sharding.rules import (
    BATCH_AXES,
    MESH_AXES,
    Rules,
    ShardingError,
    default_rules,
    get_rules,
    param_spec,
)

# Optimizer state in units of the parameters' bytes (AdamW keeps two moments).
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0, "lion": 1, "adafactor": 0}
REMAT_ORDER = ("none", "dots", "full")  # from most activation memory to least


@dataclass(frozen=True)
class Plan:
    params: int
    grads: int
    optimizer: int
    activations: int
    devices: int
    expert_params: int = 0  # of ``params``: mixture-of-experts weights (router included)
    dispatch: int = 0  # of ``activations``: the MoE layers' (dispatch buffers, expert MLPs)
    logits: int = 0  # of ``activations``: the output layer's float32 logits (see logits_bytes)
    ce_chunk: int = 0  # tokens per device and step of the chunked cross-entropy; 0: full logits
    full_logits: int = 0  # what the full logits and their gradient would take instead

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def fits(self, hbm_bytes: float) -> bool:
        return self.total <= hbm_bytes

    def table(self, hbm_bytes: float | None = None) -> str:
        rows = [
            ("parameters", self.params),
            ("  of which experts", self.expert_params),
            ("gradients", self.grads),
            ("optimizer state", self.optimizer),
            ("activations", self.activations),
            ("  of which MoE", self.dispatch),
            ("  of which logits", self.logits),
            ("total", self.total),
        ]
        rows = [(name, b) for name, b in rows if b or not name.startswith(" ")]
        lines = [f"{'per device':<20}{'GiB':>10}"]
        lines += [f"{name:<20}{b / 2**30:>10.3f}" for name, b in rows]
        if hbm_bytes:
            verdict = "fits" if self.fits(hbm_bytes) else "does NOT fit"
            lines.append(
                f"{verdict} in {hbm_bytes / 2**30:.1f} GiB "
                f"({100 * self.total / hbm_bytes:.0f}% used)"
            )
        if self.ce_chunk:
            lines.append(
                f"chunked cross-entropy ({self.ce_chunk} tokens per step) saves "
                f"{(self.full_logits - self.logits) / 2**30:.3f} GiB against full [B, T, V] logits"
            )
        return "\n".join(lines)


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        return AbstractMesh(shape, MESH_AXES)
    except TypeError:  # older signature: a tuple of (name, size) pairs
        return AbstractMesh(tuple(zip(MESH_AXES, shape, strict=True)))


@functools.lru_cache(maxsize=8)
def _param_model(cfg: ModelConfig) -> Model:
    """The model whose parameters ``cfg`` has; building one traces its init (seconds at 8B), and
    re-planning asks for the same parameters many times.

    Compute dtype and remat change no parameter's shape or dtype, so they are left out of the key.
    """
    return Model(cfg.replace(remat="none", dtype="float32"))


def _param_bytes_per_device(model, mesh, rules: Rules) -> tuple[int, int]:
    """``(all, experts)``: bytes per device of every parameter, and of those with an
    ``experts`` dimension."""
    from llmjax.sharding import _paths  # local: avoids an import cycle at package import

    names = _paths(model.param_axes())
    total = experts = 0
    for path, leaf in _paths(model.abstract_params()).items():
        spec = param_spec(path, names[path], leaf.shape, mesh, rules)
        ways = 1
        for axis in spec:
            for a in (axis,) if isinstance(axis, str) else tuple(axis or ()):
                ways *= mesh.shape[a]
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize // ways
        total += nbytes
        experts += nbytes if axes.EXPERTS in names[path] else 0
    return total, experts


def _ffn_bytes(cfg: ModelConfig, moe: bool, b: int, tp: int, ep: int) -> tuple[int, int]:
    """Per token, the feed-forward's ``(kept, dots)`` bytes: everything the backward pass would
    keep, and the projection outputs alone (what ``dots`` remat keeps)."""
    D, gated = cfg.d_model, 2 if cfg.gated_mlp else 1
    if not moe:
        f = max(cfg.resolved_mlp_dim // tp, 1)
        return b * (gated + 4) * f, b * (gated + 1) * f
    # Dispatch buffers: every token's R sorted copies and their outputs; under expert
    # parallelism every device of an expert group holds the whole group's tokens (ep of them
    # per local token, R rows each), its static worst case, since the rows are dropless.
    f, E, rows = (
        max(cfg.resolved_expert_mlp_dim // tp, 1),
        cfg.n_experts,
        ep * cfg.experts_per_token,
    )
    kept = b * (rows * (2 * D + (gated + 4) * f) + ep * D) + 4 * 3 * E  # float32 router rows
    dots = b * rows * (D + (gated + 1) * f) + 4 * E
    if cfg.shared_expert_dim:
        s = max(cfg.shared_expert_dim // tp, 1)
        kept, dots = kept + b * (gated + 4) * s, dots + b * (gated + 1) * s
    return kept, dots


def moe_activation_bytes(cfg: ModelConfig, tokens: int, tp: int, remat: str, ep: int = 1) -> int:
    """The mixture-of-experts layers' share of ``activation_bytes``."""
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    if not moe_layers:
        return 0
    kept, dots = _ffn_bytes(cfg, True, np.dtype(dtype_of(cfg.dtype)).itemsize, tp, ep)
    per_layer = {"none": kept, "dots": dots, "full": 0}[remat]
    return tokens * (moe_layers * per_layer + (0 if remat == "none" else kept))


def logits_bytes(cfg: ModelConfig, tokens: int, tp: int, ce_chunk: int | None) -> int:
    """Bytes of the output layer for ``tokens`` per device, the vocabulary split ``tp`` ways.

    Without ``ce_chunk``: the float32 logits ``[tokens, V]`` and their gradient. With it, the
    chunked cross-entropy's one float32 ``[rows, V]`` block of logits (``rows <= ce_chunk``, the
    chunk ``llmjax.losses.chunked`` takes; the backward pass turns the recomputed block into its
    gradient in place) and its float32 accumulator of the head's gradient ``[D, V]``, which each
    device keeps whole along ``D`` so that the sum over devices happens once.
    """
    V = max(cfg.vocab_size // tp, 1)
    if not ce_chunk:
        return tokens * 2 * 4 * V
    rows = math.ceil(tokens / math.ceil(tokens / ce_chunk))
    return 4 * V * (rows + cfg.d_model)


def activation_bytes(
    cfg: ModelConfig,
    tokens: int,
    seq_len: int,
    tp: int,
    remat: str,
    ep: int = 1,
    ce_chunk: int | None = DEFAULT_CHUNK,
) -> int:
    """Bytes kept for the backward pass (plus the transient peak of one layer) for ``tokens``;
    ``ep``: devices on the expert axis when mixture-of-experts layers dispatch over it;
    ``ce_chunk``: the loss's chunk (``logits_bytes``)."""
    b = np.dtype(dtype_of(cfg.dtype)).itemsize
    D, H, K, C = cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
    h, k = max(H // tp, 1), max(K // tp, 1)
    # One layer, per token: norm inputs and outputs, residuals and projections (8 x D); q/k/v
    # before and after RoPE (which works in float32); the attention output; the feed-forward's
    # hidden activations with the inputs of their derivatives; the float32 attention logits and
    # probabilities that the XLA path materialises (2 x heads x keys) and the boolean mask.
    attn = b * (8 * D + 2 * (h + 2 * k) * C + h * C) + 4 * 2 * (h + k) * C
    if cfg.attention_impl == "xla":
        attn += (4 * 2 * h + 1) * seq_len
    else:  # flash kernels keep only the output and a float32 log-sum-exp per head
        attn += 4 * h
    if cfg.post_norms:  # Gemma's second pair of norms: inputs and outputs
        attn += 4 * D * b
    if cfg.qk_norm:
        attn += 2 * (h + k) * C * b
    attn_dots = b * ((h + 2 * k) * C + 2 * D)  # projection outputs only
    per_token, peak = 0, 0
    for i in range(cfg.n_layers):
        ffn, ffn_dots = _ffn_bytes(cfg, cfg.is_moe_layer(i), b, tp, ep)
        layer = attn + ffn
        per_token += {"none": layer, "dots": attn_dots + ffn_dots, "full": b * D}[remat]
        peak = max(peak, layer)
    per_token += 0 if remat == "none" else peak
    return tokens * per_token + logits_bytes(cfg, tokens, tp, ce_chunk)


def plan(
    cfg: ModelConfig,
    mesh: str | MeshConfig | dict,
    *,
    batch_size: int,
    seq_len: int,
    rules: str | Rules = "fsdp",
    remat: str | None = None,
    optimizer: str = "adamw",
    ce_chunk: int | None = DEFAULT_CHUNK,
) -> Plan:
    """Estimate bytes per device for one training step of ``cfg`` on ``mesh``; ``ce_chunk`` is
    the loss's (``next_token_loss(..., chunk=...)``), 0 or None for full logits."""
    if isinstance(mesh, str):
        mesh = MeshConfig.parse(mesh)
    if isinstance(mesh, MeshConfig):
        free = [a for a in MESH_AXES if getattr(mesh, a) == -1]
        if free:
            raise ShardingError(
                f"the planner needs every mesh axis size; {free[0]} is -1 (give it, e.g. "
                f"{free[0]}=8)"
            )
        sizes = {a: getattr(mesh, a) for a in MESH_AXES}
    else:
        sizes = {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    bad = [f"{a}={n}" for a, n in sizes.items() if n < 1]
    if bad:
        raise ShardingError(f"mesh axis sizes must be at least 1: {', '.join(bad)}")
    rules = get_rules(rules)
    remat = remat or cfg.remat
    if remat not in REMAT_ORDER:
        raise ConfigError(f"remat={remat!r}: expected one of {REMAT_ORDER}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; known: {sorted(OPTIMIZER_MOMENTS)}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch size {batch_size} and seq_len {seq_len} must be at least 1")
    if ce_chunk is not None and not (isinstance(ce_chunk, int) and ce_chunk >= 0):
        raise ConfigError(f"ce_chunk={ce_chunk!r}: expected tokens per step >= 1, or 0 for none")
    batch_ways = math.prod(sizes[a] for a in BATCH_AXES)
    if batch_size % batch_ways:
        raise ShardingError(
            f"batch size {batch_size} is not divisible by data x fsdp x expert = {batch_ways}; "
            f"use a multiple of {batch_ways} or a mesh that divides {batch_size}"
        )
    params, expert_params = _param_bytes_per_device(_param_model(cfg), abstract_mesh(sizes), rules)
    tp = sizes["tensor"] if "tensor" in _mesh_axes_used(rules) else 1
    tokens = batch_size // batch_ways * max(seq_len // sizes["sequence"], 1)
    ep = sizes["expert"] if rules.activations.get(axes.ACT_EXPERTS) == "expert" else 1
    activations = activation_bytes(
        cfg.replace(remat=remat), tokens, seq_len, tp, remat, ep, ce_chunk
    )
    dispatch = moe_activation_bytes(cfg, tokens, tp, remat, ep)
    # The embedding table is gathered whole for the token lookup when it is sharded; sharded only
    # over fsdp, its gradient is also built whole before the reduce-scatter.
    table = cfg.vocab_size * cfg.d_model * np.dtype(dtype_of(cfg.param_dtype)).itemsize
    if tp > 1 and rules.params.get(axes.VOCAB):
        activations += table
    elif sizes["fsdp"] > 1 and rules.params.get(axes.EMBED):
        activations += 2 * table
    return Plan(
        params=params,
        grads=params,
        optimizer=OPTIMIZER_MOMENTS[optimizer] * params,
        activations=activations,
        devices=math.prod(sizes.values()),
        expert_params=expert_params,
        dispatch=dispatch,
        logits=logits_bytes(cfg, tokens, tp, ce_chunk),
        ce_chunk=ce_chunk or 0,
        full_logits=logits_bytes(cfg, tokens, tp, None),
    )


def _mesh_axes_used(rules: Rules) -> set[str]:
    used = set()
    for axis in rules.params.values():
        used.update((axis,) if isinstance(axis, str) else axis)
    return used


def mesh_spec(sizes: dict[str, int]) -> str:
    """``sizes`` as ``--mesh`` takes it (axes of size 1 left out)."""
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n != 1) or "data=1"


def alternatives(
    cfg: ModelConfig,
    sizes: dict[str, int],
    *,
    batch_size: int,
    seq_len: int,
    rules: str | None,
    remat: str | None,
    optimizer: str,
    hbm_bytes: float,
    ce_chunk: int | None = DEFAULT_CHUNK,
) -> list[tuple[str, Plan]]:
    """Changes to a plan that does not fit, each re-planned: ``(flags, plan)`` in this order.

    One change at a time: more rematerialisation, bfloat16 compute, more devices on the fsdp axis
    (the fewest that fit), a smaller global batch (the largest that fits). If none fits on its
    own: full remat with bfloat16 together, and then with more devices or a smaller batch.
    ``rules=None`` means the rules each mesh implies.
    """
    remat = remat or cfg.remat
    ways = math.prod(sizes[a] for a in BATCH_AXES)

    def replan(c, r, s=sizes, b=batch_size):
        return plan(
            c, s, batch_size=b, seq_len=seq_len, rules=rules or default_rules(s), remat=r,
            optimizer=optimizer, ce_chunk=ce_chunk,
        )  # fmt: skip

    def more_devices(c, r):
        """The fewest extra fsdp devices that fit, else as many as still lower the total."""
        best, total = None, replan(c, r).total
        for factor in (2**k for k in range(1, 11)):  # up to 1024 times the devices
            bigger = {**sizes, "fsdp": sizes["fsdp"] * factor}
            # The same global batch while it splits over the batch axes, else one per device.
            split = ways * factor
            b = batch_size if batch_size % split == 0 else -(-batch_size // split) * split
            flags = f"--mesh {mesh_spec(bigger)}" + ("" if b == batch_size else f" --batch {b}")
            try:
                found = (flags, replan(c, r, s=bigger, b=b))
            except ShardingError:  # a parameter the larger fsdp axis does not divide
                break
            if found[1].total > 0.95 * total:
                break  # activations dominate: more devices no longer help
            best, total = found, found[1].total
            if best[1].fits(hbm_bytes):
                break
        return best

    def smaller_batch(c, r):
        """The largest halved global batch that fits, else the smallest the mesh can split."""
        best, b = None, batch_size
        while b % 2 == 0 and (b // 2) % ways == 0:
            b //= 2
            best = (f"--batch {b}", replan(c, r, b=b))
            if best[1].fits(hbm_bytes):
                break
        return best

    out = [(f"--remat {r}", replan(cfg, r)) for r in REMAT_ORDER[REMAT_ORDER.index(remat) + 1 :]]
    bf16 = cfg.replace(dtype="bfloat16")
    if cfg.dtype != "bfloat16":
        out.append(("--dtype bfloat16", replan(bf16, remat)))
    out += [found for found in (more_devices(cfg, remat), smaller_batch(cfg, remat)) if found]
    base = ([] if remat == "full" else ["--remat full"]) + (
        [] if cfg.dtype == "bfloat16" else ["--dtype bfloat16"]
    )
    if any(p.fits(hbm_bytes) for _, p in out) or not base:
        return out
    both = replan(bf16, "full")
    if len(base) > 1:
        out.append((" ".join(base), both))
    if not both.fits(hbm_bytes):
        for found in (more_devices(bf16, "full"), smaller_batch(bf16, "full")):
            if found:
                out.append((" ".join([*base, found[0]]), found[1]))
    return out


def _chunk_arg(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (0: full logits), got {value}")
    return value


def parser():
    """The flags of ``llmjax plan``."""
    from llmjax.cli import HelpFormatter, Parser, positive_int

    ap = Parser(
        prog="llmjax plan",
        description="Bytes per device of one training step: parameters, gradients, optimizer "
        "state and activations. With --hbm, says whether it fits and, if not, re-plans with "
        "more remat, bfloat16, more devices and a smaller batch to show what would.",
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--preset", required=True, metavar="NAME", help="model preset, e.g. llama3-8b")
    ap.add_argument(
        "--mesh",
        default="data=1",
        metavar="SPEC",
        help="axis=size pairs over data, fsdp, expert, sequence, tensor, e.g. fsdp=8 or "
        "fsdp=4,tensor=2",
    )
    ap.add_argument(
        "--rules",
        default=None,
        metavar="NAME",
        help="parallelism preset: dp, fsdp, tp, fsdp_tp, ep or ep_tp (default: the one the mesh "
        "implies)",
    )
    ap.add_argument(
        "--batch", type=positive_int, required=True, metavar="B", help="global batch (sequences)"
    )
    ap.add_argument(
        "--seq-len", type=positive_int, required=True, metavar="T", help="tokens per sequence"
    )
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype (default: the preset's)",
    )
    ap.add_argument(
        "--param-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype (default: the preset's)",
    )
    ap.add_argument(
        "--remat",
        default=None,
        choices=list(REMAT_ORDER),
        help="what the backward pass recomputes (default: the preset's)",
    )
    ap.add_argument(
        "--attention-impl",
        default=None,
        choices=["xla", "cudnn", "pallas"],
        help="attention kernel (default: the preset's)",
    )
    ap.add_argument(
        "--optimizer",
        default="adamw",
        choices=sorted(OPTIMIZER_MOMENTS),
        help="sets the optimizer state's size",
    )
    ap.add_argument(
        "--ce-chunk",
        type=_chunk_arg,
        default=DEFAULT_CHUNK,
        metavar="N",
        help="tokens per device the chunked cross-entropy projects to the vocabulary at a time "
        "(the training losses' chunk); 0: full [B, T, V] logits",
    )
    ap.add_argument(
        "--hbm",
        type=float,
        default=None,
        metavar="GIB",
        help="device memory in GiB, e.g. 80 or 95 (default: none, no verdict)",
    )
    return ap


def main(argv=None) -> int:
    """``llmjax plan``: bytes per device of a training step, whether it fits, and what would."""
    from llmjax import presets

    args = parser().parse_args(argv)
    if args.hbm is not None and not args.hbm > 0:
        raise ConfigError(f"--hbm {args.hbm}: device memory must be positive (GiB)")
    cfg = presets.get(args.preset)
    changes = {
        k: v
        for k, v in [
            ("dtype", args.dtype),
            ("param_dtype", args.param_dtype),
            ("attention_impl", args.attention_impl),
        ]
        if v
    }
    cfg = cfg.replace(**changes) if changes else cfg
    mesh_cfg = MeshConfig.parse(args.mesh)
    sizes = {a: getattr(mesh_cfg, a) for a in MESH_AXES}
    rules = args.rules or default_rules(sizes)
    p = plan(
        cfg,
        mesh_cfg,
        batch_size=args.batch,
        seq_len=args.seq_len,
        rules=rules,
        remat=args.remat,
        optimizer=args.optimizer,
        ce_chunk=args.ce_chunk,
    )
    print(
        f"{cfg.name}: {_param_model(cfg).num_params():,} parameters; mesh {args.mesh} "
        f"({p.devices} device{'s' if p.devices > 1 else ''}), "
        f"rules {rules}, batch {args.batch} x {args.seq_len}, remat {args.remat or cfg.remat}, "
        f"{cfg.param_dtype} params / {cfg.dtype} compute"
    )
    hbm = args.hbm * 2**30 if args.hbm else None
    print(p.table(hbm))
    if hbm and not p.fits(hbm):
        options = alternatives(
            cfg, sizes, batch_size=args.batch, seq_len=args.seq_len, rules=args.rules,
            remat=args.remat, optimizer=args.optimizer, hbm_bytes=hbm, ce_chunk=args.ce_chunk,
        )  # fmt: skip
        if not options:
            print(
                "none of the changes the planner tries (more remat, bfloat16, more fsdp "
                "devices, a smaller batch) is possible here or lowers the total"
            )
        else:
            print("re-planned with each change (total per device):")
        width = max((len(f) for f, _ in options), default=0)
        for flags, q in options:
            verdict = "fits" if q.fits(hbm) else "does NOT fit"
            print(f"  {flags:<{width}}  {q.total / 2**30:>10.3f} GiB  {verdict}")
    return 0
