"""The one axis vocabulary of llmjax.

Single letters name array dimensions in einsums and in variable suffixes (``x_BTD``):

    B  batch                 T  query length          S  key/value length
    D  model width (embed)   H  query heads           K  key/value heads
    G  query heads per kv head (H = K * G)            C  channels per head (head_dim)
    F  MLP hidden width      V  vocabulary            E  experts
    L  layers                P  positions (learned position table)
    N  tokens of a batch flattened (B * T)            R  routes per token (experts_per_token)
    A  token-to-expert assignments (N * R), sorted by expert in a mixture-of-experts layer
    M  slots per expert (capacity-limited dispatch)

Long logical names exist only for sharding: every parameter carries a tuple of them (see
``PARAM_AXES``), and activations are constrained at block boundaries with the ``ACT_*`` names.
A rule table (``llmjax.sharding``) maps logical names to mesh axes; model code never names a
mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding, PartitionSpec

# Logical names of parameter dimensions.
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERTS = "experts"
LAYERS = "layers"
POSITIONS = "positions"
NORM = "norm"

# Logical names of activation dimensions.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_HEADS = "activation_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_EXPERTS = "activation_experts"  # the mesh axis experts are split over

PARAM_NAMES = (EMBED, VOCAB, HEADS, KV_HEADS, HEAD_DIM, MLP, EXPERTS, LAYERS, POSITIONS, NORM)
ACTIVATION_NAMES = (
    ACT_BATCH,
    ACT_LENGTH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_KV_HEADS,
    ACT_MLP,
    ACT_VOCAB,
    ACT_EXPERTS,
)


# --- activation constraints -------------------------------------------------------------------
# Model code calls ``constrain(x, names)`` at block boundaries. It is a no-op unless a rule table
# is active (``use_rules``), so models stay runnable on one device with no mesh at all.

_RULES: contextvars.ContextVar = contextvars.ContextVar("llmjax_axis_rules", default=None)


@contextlib.contextmanager
def use_rules(mesh, rules):
    """Activate ``rules`` (logical name -> mesh axis or tuple of axes, or None) on ``mesh``."""
    token = _RULES.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _RULES.reset(token)


def active_rules():
    return _RULES.get()


def logical_to_spec(names, rules):
    """PartitionSpec for a tuple of logical names under ``rules``; a mesh axis is used once."""
    used, out = set(), []
    for name in names:
        axis = rules.get(name) if name is not None else None
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def constrain(x, names):
    active = _RULES.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
