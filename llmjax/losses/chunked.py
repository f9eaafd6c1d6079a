"""Cross-entropy statistics from the final hidden states, a chunk of tokens at a time.

The plain path projects every token to the vocabulary at once: float32 logits ``[B, T, V]`` in
the forward pass and their gradient in the backward pass, 8 GiB each at V = 128k and 16k tokens
per device. Losses that read only each target's log-probability need three numbers per token:
the target's logit, the log normaliser ``log Z`` (for the log-prob and the z-loss) and whether
the target is the arg-max (``mean_token_accuracy``). ``chunked_logit_stats`` computes them from
the hidden states ``[B, T, D]`` and the head weight, scanning over chunks of tokens, so that only
a ``[chunk, V]`` block of logits ever exists; its custom VJP recomputes each chunk's logits in the
backward pass and forms ``softmax - onehot`` there (scaled by the cotangents of the target logit
and of ``log Z``, through the temperature and the soft-cap), adding each chunk's share of the
head's gradient to one float32 accumulator ``[D, V]`` and giving each chunk's hidden-state
gradient. What stays alive is one float32 block ``[chunk, V]`` and that accumulator.

``chunk`` counts tokens per device and step of the scan: under an active rule table
(``llmjax.axes.use_rules``) whose activation batch or length is split over ``W`` devices, each
scan step takes ``chunk`` tokens from each device's own rows, ``W * chunk`` in all, so no rows
move between devices; each device accumulates its own tokens' share of the head's gradient
(``[W, D, V]``, split over the devices) and the sum over devices happens once, after the scan,
as the plain path's single matmul needs it once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llmjax import axes
from llmjax.config import dtype_of
from llmjax.errors import InputError

# Tokens per device and scan step. At V = 128256 a float32 [1024, V] block is 0.49 GiB, a quarter
# of the float32 head-gradient accumulator that D = 4096 needs anyway (1.96 GiB); smaller chunks
# would save at most 0.4 GiB more for more, smaller matmuls (on one CPU core, loss + gradient took
# 0.81 of the full path's time with 1024, 0.92 with 256; docs/benchmarks.md).
DEFAULT_CHUNK = 1024


class LogitStats(NamedTuple):
    """Per token ``[B, T]``, all float32 but ``hit``: the target's logit, ``log Z`` (the
    log-sum-exp of the row) and whether the target is the row's arg-max (bool, no gradient)."""

    target: jax.Array
    log_z: jax.Array
    hit: jax.Array

    @property
    def logp(self) -> jax.Array:
        """``log softmax(logits)[target]``."""
        return self.target - self.log_z


@dataclass(frozen=True)
class _Head:
    """The static description of the projection the scan repeats."""

    tied: bool  # the weight is the embedding table [V, D]; else a head [D, V]
    dtype: object  # compute dtype of the matmul (the model's ``dtype``)
    softcap: float | None
    temperature: float
    mesh: object = None  # the active rule table's mesh, when tokens are split over devices
    token_axes: tuple = ()  # its axes that split the tokens
    ways: int = 1  # devices along them

    def split(self, x, dim: int):
        """``x`` constrained to be split over the token axes along ``dim``, its other dims left
        to the compiler (a head split over the vocabulary stays split)."""
        if not self.token_axes:
            return x
        spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
        spec[dim] = self.token_axes
        sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        return jax.lax.with_sharding_constraint(x, sharding)

    def logits(self, x_MD, w):
        """The chunk's float32 logits ``[M, V]`` and the pre-cap ``tanh`` (or None)."""
        eq = "MD,VD->MV" if self.tied else "MD,DV->MV"
        logits = jnp.einsum(eq, x_MD, w, preferred_element_type=jnp.float32)
        if self.dtype != jnp.float32:
            # Rounded to the compute dtype, as the plain path's einsum output is before its cast
            # to float32. Spelled out: XLA drops a round trip through a narrower type inside
            # the scan (measured on CPU: bfloat16 logits 3.1e-2 off the plain path's).
            info = jnp.finfo(self.dtype)
            logits = jax.lax.reduce_precision(logits, info.nexp, info.nmant)
        th = None
        if self.softcap is not None:
            th = jnp.tanh(logits / self.softcap)
            logits = self.softcap * th
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits, th

    def raw_cotangent(self, d_MV, th):
        """The cotangent of the einsum's output from that of the final logits."""
        if self.temperature != 1.0:
            d_MV = d_MV / self.temperature
        if th is not None:  # d/dz cap * tanh(z / cap) = 1 - tanh^2
            d_MV = d_MV * (1.0 - jnp.square(th))
        return d_MV.astype(self.dtype)


def chunked_logit_stats(
    hidden_BTD,
    w,
    targets_BT,
    keep_BT=None,
    *,
    tied: bool,
    dtype=jnp.float32,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> LogitStats:
    """``LogitStats`` of ``logits = softcap(hidden . w) / temperature`` without forming
    ``[B, T, V]``.

    ``hidden_BTD`` are the final hidden states (``model.apply(..., return_hidden=True)``: after the
    final norm, float32), ``w`` the head as an array: ``lm_head [D, V]``, or with ``tied`` the
    embedding table ``[V, D]``. Both are cast to ``dtype`` (the model's compute dtype) and the
    matmul's output is rounded to it before the float32 softmax, as ``model.apply`` computes its
    logits; ``softcap`` is ``cap * tanh(logits / cap)`` (Gemma's final soft-cap). Gradients reach
    ``hidden_BTD`` and ``w`` through ``target`` and ``log_z``; the head's gradient is summed over
    the chunks in float32.

    ``keep_BT`` (bool or float, optional) marks the tokens a loss reads; the others may hold any
    target, -100 included, and any hidden state: they are replaced by 0 before the projection, so
    their statistics are finite and meaningless and no NaN reaches a gradient. ``chunk`` tokens
    per device are projected at a time (see the module docstring).
    """
    if not (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1):
        raise InputError(f"chunk={chunk!r} must be a positive int (tokens per device and step)")
    B, T, D = hidden_BTD.shape
    if targets_BT.shape != (B, T) or (keep_BT is not None and keep_BT.shape != (B, T)):
        mask = "" if keep_BT is None else f" and keep_BT {keep_BT.shape}"
        raise InputError(
            f"targets_BT {targets_BT.shape}{mask} must have the hidden states' [B, T] = "
            f"{[B, T]}: give one target per token"
        )
    want = (w.shape[1] if tied else w.shape[0]) if w.ndim == 2 else None
    if want != D:
        layout = "[V, D] (tied)" if tied else "[D, V]"
        raise InputError(
            f"head weight has shape {tuple(w.shape)}, expected {layout} with D = {D} like the "
            "hidden states; pass the embedding table with tied=True, the lm_head with tied=False"
        )
    N = B * T
    mesh, token_axes, ways = _token_split(N)
    head = _Head(bool(tied), jnp.dtype(dtype), softcap, float(temperature), mesh, token_axes, ways)
    x_ND = hidden_BTD.reshape(N, D).astype(head.dtype)
    t_N = targets_BT.reshape(N).astype(jnp.int32)
    if keep_BT is not None:
        keep_N = keep_BT.reshape(N).astype(bool)
        x_ND = jnp.where(keep_N[:, None], x_ND, 0)
        t_N = jnp.where(keep_N, t_N, 0)
    x_KMD, K, per = _chunked(head, x_ND, chunk)
    t_KM, _, _ = _chunked(head, t_N, chunk)
    target_KM, log_z_KM, hit_KM = _stats(head, x_KMD, w.astype(head.dtype), t_KM)
    target, log_z, hit = (
        _unchunked(head, s, K, per, N).reshape(B, T) for s in (target_KM, log_z_KM, hit_KM)
    )
    return LogitStats(target, log_z, jax.lax.stop_gradient(hit))


def head_weight(cfg, params):
    """The unembedding of a model with config ``cfg`` as one array, read as ``model.apply`` reads
    it: the tied embedding table ``[V, D]`` or ``lm_head [D, V]``.

    A head that is not a plain array is materialised the way the plain path's ``w[...]`` does: a
    LoRA-adapted head (``llmjax.lora.LoraWeight``) as its merged weight, whose gradient reaches
    the adapter through the merge (no LoRA dropout on the head, in either path), and a quantized
    one (``llmjax.inference.quantize.QuantizedTensor``) dequantized. Either is a transient
    ``[D, V]`` array, the size of the weight, never of the logits.
    """
    w = params["embed"] if cfg.tie_embeddings else params.get("lm_head")
    if w is None:
        raise InputError(
            f"params have no lm_head, which {cfg.name!r} needs for logits (a scorer's decoder "
            "has none); score its hidden states instead"
        )
    return w if isinstance(w, jax.Array) else w[...]


def head_logit_stats(
    cfg,
    params,
    hidden_BTD,
    targets_BT,
    keep_BT=None,
    *,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
) -> LogitStats:
    """``chunked_logit_stats`` with the head, compute dtype and soft-cap of the model config
    ``cfg`` and its ``params`` (see ``head_weight``)."""
    return chunked_logit_stats(
        hidden_BTD,
        head_weight(cfg, params),
        targets_BT,
        keep_BT,
        tied=cfg.tie_embeddings,
        dtype=dtype_of(cfg.dtype),
        softcap=cfg.final_logit_softcap,
        temperature=temperature,
        chunk=chunk,
    )


def plain_logit_stats(logits_BTV, targets_BT, keep_BT=None, *, temperature: float = 1.0):
    """``LogitStats`` of full logits ``[B, T, V]`` (the reference the chunked path equals), with
    ``keep_BT`` as in ``chunked_logit_stats``."""
    logits = logits_BTV.astype(jnp.float32)
    if keep_BT is not None:
        keep_BT = keep_BT.astype(bool)
        logits = jnp.where(keep_BT[..., None], logits, 0.0)
        targets_BT = jnp.where(keep_BT, targets_BT, 0)
    if temperature != 1.0:
        logits = logits / temperature
    target = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    hit = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1) == targets_BT)
    return LogitStats(target, jax.nn.logsumexp(logits, axis=-1), hit)


# --- layout -------------------------------------------------------------------------------------
# N tokens are viewed as [W, n] (W devices' rows, as the batch sharding splits them), each
# device's n padded to K chunks of ``per`` <= chunk tokens, and stacked as [K, W * per]: scan step
# k reads chunk k of every device, so the sharded axis is never the scanned one.


def _token_split(n: int):
    """``(mesh, axes, ways)``: the mesh axes the active rule table splits the flattened tokens
    over and their product; no axes without a table, or when they do not divide the ``n``
    tokens."""
    active = axes.active_rules()
    if active is None:
        return None, (), 1
    mesh, rules = active
    names = []
    for entry in axes.logical_to_spec((axes.ACT_BATCH, axes.ACT_LENGTH), rules):
        names += [entry] if isinstance(entry, str) else list(entry or ())
    ways = math.prod(mesh.shape[a] for a in names)
    if not names or n % ways:
        return None, (), 1
    return mesh, tuple(names), ways


def _chunked(head: _Head, x_N, chunk: int):
    """``x [N, ...]`` as ``[K, ways * per, ...]``, zero-padded; also ``K`` and ``per``."""
    W = head.ways
    n = x_N.shape[0] // W
    K = max(math.ceil(n / chunk), 1)
    per = max(math.ceil(n / K), 1)  # chunks of equal size: at most K - 1 padded tokens
    rest = x_N.shape[1:]
    x = x_N.reshape(W, n, *rest)
    x = jnp.pad(x, [(0, 0), (0, K * per - n)] + [(0, 0)] * len(rest))
    x = x.reshape(W, K, per, *rest).swapaxes(0, 1)
    return head.split(x.reshape(K, W * per, *rest), 1), K, per


def _unchunked(head: _Head, x_KM, K: int, per: int, N: int):
    W = head.ways
    x = x_KM.reshape(K, W, per).swapaxes(0, 1).reshape(W, K * per)
    return x[:, : N // W].reshape(N)


# --- the scan and its VJP -----------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(head: _Head, x_KMD, w, t_KM):
    return _forward(head, x_KMD, w, t_KM)


def _forward(head, x_KMD, w, t_KM):
    def step(_, xs):
        x_MD, t_M = xs
        logits, _ = head.logits(x_MD, w)
        target = jnp.take_along_axis(logits, t_M[:, None], axis=1)[:, 0]
        hit = jnp.argmax(logits, axis=1) == t_M
        return None, (target, jax.nn.logsumexp(logits, axis=1), hit)

    return jax.lax.scan(step, None, (x_KMD, t_KM))[1]


def _stats_fwd(head, x_KMD, w, t_KM):
    target, log_z, hit = _forward(head, x_KMD, w, t_KM)
    return (target, log_z, hit), (x_KMD, w, t_KM, log_z)


def _stats_bwd(head, residuals, cotangents):
    # Per chunk: d logits = g_z * softmax + g_t * onehot(target), through the temperature and the
    # soft-cap to the einsum's output, then the two products. A loss's own terms (the mean, the
    # mask, the z-loss's 2 log Z) arrive inside g_t and g_z, so this rule serves every loss.
    x_KMD, w, t_KM, log_z_KM = residuals
    g_target_KM, g_log_z_KM, _ = cotangents
    V = w.shape[0] if head.tied else w.shape[1]

    W = head.ways

    def step(dw_W, xs):
        x_MD, t_M, log_z_M, g_t_M, g_z_M = xs
        logits, th = head.logits(x_MD, w)
        d_MV = g_z_M[:, None] * jnp.exp(logits - log_z_M[:, None])
        onehot = jnp.arange(V, dtype=jnp.int32)[None, :] == t_M[:, None]
        d_MV = d_MV + jnp.where(onehot, g_t_M[:, None], 0.0)
        d_MV = head.raw_cotangent(d_MV, th)
        # Each device adds its own tokens' share to its own partial sum [W, ...]: the sum over
        # devices happens once, after the scan, not once per chunk.
        x_WPD, d_WPV = x_MD.reshape(W, -1, x_MD.shape[-1]), d_MV.reshape(W, -1, V)
        f32 = jnp.float32
        if head.tied:
            dx = jnp.einsum("MV,VD->MD", d_MV, w)
            dw_W += jnp.einsum("WPV,WPD->WVD", d_WPV, x_WPD, preferred_element_type=f32)
        else:
            dx = jnp.einsum("MV,DV->MD", d_MV, w)
            dw_W += jnp.einsum("WPD,WPV->WDV", x_WPD, d_WPV, preferred_element_type=f32)
        return head.split(dw_W, 0), dx

    xs = (x_KMD, t_KM, log_z_KM, g_target_KM, g_log_z_KM)
    zeros = head.split(jnp.zeros((W, *w.shape), jnp.float32), 0)
    dw_W, dx_KMD = jax.lax.scan(step, zeros, xs)
    return dx_KMD, dw_W.sum(0).astype(w.dtype), None


_stats.defvjp(_stats_fwd, _stats_bwd)
