"""Weight-only quantization of the linear layers: int8 per output channel, int4 and NF4 in blocks.

Format. A weight is viewed as a matrix ``[I, O]`` (its input dims flattened first, then its
output dims) and stored as a ``QuantizedTensor``:

- ``int8``: ``q`` int8 ``[I, O]``, ``scale`` float32 ``[1, O]`` = max|w| / 127 over each output
  channel (symmetric, no zero point).
- ``int4``: ``I`` split into groups of ``group_size`` consecutive inputs; ``scale`` float32
  ``[I/g, 1, O]`` = max|w| / 7 per group and output; values in [-8, 7] are stored offset by 8, two
  per byte (``q`` uint8 ``[I/g, g/2, O]``, low nibble first), so the stored weight is half a byte
  per value plus one scale per group.
- ``nf4`` (QLoRA's 4-bit NormalFloat): the same blocks and packing as int4, with ``scale`` =
  max|w| per block and each value stored as the index of the nearest of 16 levels in [-1, 1]
  (``NF4_LEVELS``), not as an integer: the levels are quantiles of a normal distribution, so they
  sit closer together where most weights of a block are (near zero).

Which weights: every parameter whose logical axes (``model.param_axes()``) make it a linear map:
first axis ``embed`` (q/k/v, MLP gate/up, untied ``lm_head``: the input is ``embed``) or last axis
``embed`` (attention output ``heads, head_dim -> embed`` and MLP ``down``: the input is every axis
but the last). Embedding tables (``vocab``/``positions`` x ``embed``), norms and biases stay as
they are: they are small, and a tied embedding doubles as the output head, where errors cost most.

``QuantizedModel(model).apply(qparams, ...)`` dequantizes inside the (jitted) call, so only the
quantized arrays persist in memory; XLA materialises each dequantized weight transiently.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax import axes as ax
from llmjax.errors import InputError
from llmjax.models.scan import layer_axes, selects

MODES = ("int8", "int4", "nf4")

# The NormalFloat4 levels as published (Dettmers et al., 2023, QLoRA, appendix E) and used by
# bitsandbytes: quantiles of N(0, 1), 8 for the positive side and 7 for the negative side so that
# 0 is exact, divided by the largest. Kept as published (float32) rather than recomputed, so a
# code dequantizes to the same value here as in other NF4 implementations.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# A value above the midpoint of two neighbouring levels takes the upper one (as bitsandbytes).
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2


@struct.dataclass
class QuantizedTensor:
    q: jax.Array
    scale: jax.Array
    shape: tuple = struct.field(pytree_node=False)  # original shape
    perm: tuple = struct.field(pytree_node=False)  # axes order that puts the input dims first
    n_in: int = struct.field(pytree_node=False)  # how many leading (permuted) dims are input
    bits: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)
    mode: str = struct.field(pytree_node=False)  # "int8", "int4" or "nf4"

    @property
    def stacked(self) -> bool:
        """Whether this holds a scanned model's repeats ``[R, ...]`` (``quantize`` vmaps over
        them, so ``shape`` and the other static fields describe one layer)."""
        return self.q.ndim > (2 if self.bits == 8 else 3)

    def dequantize(self) -> jax.Array:
        if self.stacked:
            return jax.vmap(type(self).dequantize)(self)
        if self.bits == 8:
            w = self.q.astype(jnp.float32) * self.scale
        else:
            low = (self.q & 0xF).astype(jnp.int32)
            high = (self.q >> 4).astype(jnp.int32)
            codes = jnp.stack([low, high], axis=2).reshape(self.q.shape[0], -1, self.q.shape[-1])
            if self.mode == "nf4":
                w = jnp.asarray(NF4_LEVELS)[codes] * self.scale
            else:
                w = (codes - 8).astype(jnp.float32) * self.scale
        permuted = tuple(self.shape[i] for i in self.perm)
        w = w.reshape(permuted).transpose(np.argsort(self.perm))
        return w.astype(self.dtype)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)

    def __getitem__(self, idx):
        """The dequantized weight (what a layer reading ``w[...]`` gets)."""
        return self.dequantize()[idx]

    def project(self, eq: str, x, dtype):
        """``einsum(eq, x, W)``; the dequantized ``W`` is recomputed in the backward pass rather
        than kept alive from the forward, so only the quantized blocks stay in memory."""
        from llmjax.layers.params import flat_einsum

        n_in = self.n_in if self.perm[: self.n_in] == tuple(range(self.n_in)) else 1
        matmul = lambda x, w: flat_einsum(eq, x, w.dequantize().astype(dtype), n_in)  # noqa: E731
        return jax.checkpoint(matmul)(x, self)


def linear_input_axes(names: tuple) -> tuple[int, ...] | None:
    """Indices of a weight's input dims from its logical names, or None if it is not linear."""
    if len(names) < 2 or names[0] in (ax.VOCAB, ax.POSITIONS):
        return None
    if names[0] == ax.EMBED:
        return (0,)
    if names[-1] == ax.EMBED:
        return tuple(range(len(names) - 1))
    return None


def quantize_tensor(w, in_axes: tuple[int, ...], mode: str, group_size: int = 64):
    if mode not in MODES:
        raise InputError(f"quantization mode={mode!r}: give one of {MODES}")
    out_axes = tuple(i for i in range(w.ndim) if i not in in_axes)
    perm = tuple(in_axes) + out_axes
    I = math.prod(w.shape[i] for i in in_axes)
    w2 = jnp.transpose(w, perm).reshape(I, -1).astype(jnp.float32)
    meta = dict(shape=tuple(w.shape), perm=perm, n_in=len(in_axes), dtype=str(w.dtype), mode=mode)
    if mode == "int8":
        scale = jnp.max(jnp.abs(w2), axis=0, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = jnp.clip(jnp.round(w2 / scale), -127, 127).astype(jnp.int8)
        return QuantizedTensor(q=q, scale=scale, bits=8, **meta)
    check_group_size(group_size, I, w.shape, mode)
    w3 = w2.reshape(I // group_size, group_size, -1)
    absmax = jnp.max(jnp.abs(w3), axis=1, keepdims=True)
    if mode == "nf4":
        scale = jnp.where(absmax > 0, absmax, 1.0)
        q = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), w3 / scale, side="left")
        q = q.astype(jnp.uint8)
    else:
        scale = absmax / 7.0
        scale = jnp.where(scale > 0, scale, 1.0)
        q = (jnp.clip(jnp.round(w3 / scale), -8, 7) + 8).astype(jnp.uint8)
    pairs = q.reshape(I // group_size, group_size // 2, 2, -1)
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return QuantizedTensor(q=packed, scale=scale, bits=4, **meta)


def check_group_size(group_size, size: int, shape, mode: str = "int4") -> None:
    """4-bit groups pack two nibbles per byte and tile a weight's input: even, and a divisor."""
    ok = isinstance(group_size, int) and group_size > 0
    if ok and not (group_size % 2 or size % group_size):
        return
    fits = [g for g in range(2, size + 1, 2) if not size % g]
    fix = f"pick an even divisor of {size}, e.g. {([g for g in fits if g <= 64] or fits)[-1]}"
    raise InputError(
        f"{mode} group_size={group_size!r}: must be even and divide the input size {size} of a "
        f"weight of shape {tuple(shape)}; {fix if fits else 'use int8'}"
    )


def quantize(model, params, mode: str = "int8", group_size: int = 64, keep: str = ""):
    """``params`` with every linear weight replaced by a ``QuantizedTensor`` (see module doc),
    except those whose dotted path (``lm_head``, ``layers.0.attn.wq``) matches the regex ``keep``
    whole: they stay as they are."""
    cfg = model.config
    names = model.param_axes()
    if mode not in MODES:
        raise InputError(f"quantization mode={mode!r}: give one of {MODES}")
    try:
        kept = re.compile(keep) if keep else None
    except re.error as e:
        raise InputError(f"keep={keep!r} is not a regular expression: {e}") from None

    def selected(path: str, n) -> tuple[int, ...] | None:
        if kept is not None and selects(cfg, kept, path, "quantize keep"):
            return None
        return linear_input_axes(layer_axes(n))

    def linear(p, n, path=""):
        if isinstance(p, dict):
            return [w for k in p for w in linear(p[k], n[k], f"{path}.{k}".lstrip("."))]
        in_axes = selected(path, n)
        shape = p.shape[len(n) - len(layer_axes(n)) :]
        return [] if in_axes is None else [(math.prod(shape[i] for i in in_axes), shape)]

    if mode != "int8":  # every weight is checked before any is quantized
        for size, shape in linear(params, names):
            check_group_size(group_size, size, shape, mode)

    def visit(p, n, path=""):
        if isinstance(p, dict):
            return {k: visit(p[k], n[k], f"{path}.{k}".lstrip(".")) for k in p}
        in_axes = selected(path, n)
        if in_axes is None:
            return p
        one = lambda w: quantize_tensor(w, in_axes, mode, group_size)  # noqa: E731
        return jax.vmap(one)(p) if n[0] == ax.LAYERS else one(p)

    return visit(params, names)


def dequantize(params):
    is_q = lambda x: isinstance(x, QuantizedTensor)
    return jax.tree.map(lambda x: x.dequantize() if is_q(x) else x, params, is_leaf=is_q)


def param_bytes(params) -> int:
    """Bytes held by a (possibly quantized) parameter tree."""
    return int(sum(x.nbytes for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A ``Model`` whose ``apply`` takes quantized parameters (``quantize``'s output).

    It has the methods the samplers use (``apply``, ``init_cache``, ``config``), so it can be
    passed to ``generate`` and ``speculative_generate`` in place of the model.
    """

    model: object

    @property
    def config(self):
        return self.model.config

    def apply(self, qparams, tokens, **kwargs):
        return self.model.apply(dequantize(qparams), tokens, **kwargs)

    def init_cache(self, *args, **kwargs):
        return self.model.init_cache(*args, **kwargs)

    def param_axes(self):
        return self.model.param_axes()
