"""``flash_attention``: the public op, its custom VJP, padding, and the choice of implementation."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from llmjax.kernels import common, flash_triton, reference

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. ``block_q``/``block_k`` tile the forward and dQ passes, ``*_bwd`` the dK/dV
    pass; ``num_warps``/``num_stages`` are GPU-only. Shrunk automatically for short sequences."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2


# Measured defaults per head dim (see docs/benchmarks.md); TPU blocks are MXU multiples.
_GPU_DEFAULTS = {
    64: BlockSizes(128, 64, 64, 64, 4, 3, 4, 2),
    128: BlockSizes(128, 64, 64, 64, 4, 2, 4, 2),
    256: BlockSizes(64, 32, 64, 32, 4, 2, 4, 1),
}
# fp32 tiles hold twice the bytes per element and use the slower IEEE fp32 dot: smaller tiles
# keep the Triton compile and register use bounded.
_GPU_F32_DEFAULTS = {
    64: BlockSizes(64, 32, 32, 32, 4, 1, 4, 1),
    128: BlockSizes(64, 32, 32, 32, 4, 1, 4, 1),
    256: BlockSizes(32, 16, 16, 16, 4, 1, 4, 1),
}
_TPU_DEFAULTS = BlockSizes(512, 512, 256, 256)


def default_block_sizes(implementation: str, head_dim: int, dtype=jnp.bfloat16) -> BlockSizes:
    if implementation == "pallas_mosaic_tpu":
        return _TPU_DEFAULTS
    if jnp.dtype(dtype) == jnp.float32:
        return _GPU_F32_DEFAULTS[64 if head_dim <= 64 else 128 if head_dim <= 128 else 256]
    return _GPU_DEFAULTS.get(head_dim, _GPU_DEFAULTS[128] if head_dim < 256 else _GPU_DEFAULTS[256])


def _unsupported(implementation, head_dim, dtype):
    """Why ``implementation`` cannot run these inputs, or None."""
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {dtype} (supported: float32, bfloat16, float16)"
    if implementation == "pallas_triton" and not (
        16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0
    ):
        return f"head_dim {head_dim} (Triton tiles need a power of two in [16, 256])"
    if implementation == "pallas_mosaic_tpu" and not (head_dim == 64 or head_dim % 128 == 0):
        return f"head_dim {head_dim} (TPU tiles need 64 or a multiple of 128)"
    if implementation == "pallas_mosaic_gpu":
        from llmjax.kernels import flash_mgpu

        return flash_mgpu.supported(head_dim, dtype)
    return None


def _mgpu_backward_ok(head_dim, dtype):
    from llmjax.kernels import flash_mgpu_bwd

    return flash_mgpu_bwd.supported(head_dim, dtype) is None


def _is_hopper():
    """The Mosaic GPU forward uses wgmma, which exists on compute capability 9.0 only."""
    device = jax.devices()[0]
    return getattr(device, "compute_capability", None) == "9.0"


def choose_implementation(implementation, interpret, head_dim, dtype, op="flash_attention"):
    """Resolve ``implementation`` (None or "pallas" = by platform) to one of IMPLEMENTATIONS."""
    platform = jax.default_backend()
    if implementation in (None, "pallas"):
        if platform == "tpu":
            implementation = "pallas_mosaic_tpu"
        elif platform in ("gpu", "cuda", "rocm") or interpret:
            implementation = "pallas_triton"
        else:
            return "xla"  # CPU without interpret: the reference is the fast path there
        why = _unsupported(implementation, head_dim, dtype)
        if why is not None:
            log.warning(
                "%s: %s does not support %s; using the XLA reference", op, implementation, why
            )
            return "xla"
        return implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, None or 'pallas'")
    why = _unsupported(implementation, head_dim, dtype) if implementation != "xla" else None
    if why is not None:
        raise ValueError(f"{op}: {implementation} does not support {why}")
    return implementation


def _round_up(x, m):
    return -(-x // m) * m


def _fit(block, n, minimum):
    """Largest useful block for a sequence of n: no bigger than n rounded up to a power of two."""
    return max(minimum, min(block, 1 << max(0, (n - 1).bit_length())))


@dataclasses.dataclass(frozen=True)
class _Plan:
    spec: common.MaskSpec
    implementation: str
    blocks: BlockSizes
    interpret: bool
    mosaic_backward: bool = False  # the Mosaic GPU dQ and dK/dV kernels instead of Triton's


def _pad_to(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _padded(plan, q, k, v, q_seg, kv_seg):
    b = plan.blocks
    t_pad = _round_up(q.shape[1], max(b.block_q, b.block_q_bwd))
    s_pad = _round_up(k.shape[1], max(b.block_k, b.block_k_bwd))
    q, k, v = _pad_to(q, 1, t_pad), _pad_to(k, 1, s_pad), _pad_to(v, 1, s_pad)
    if q_seg is not None:  # padding ids never match a real query's id (beyond kv_len anyway)
        q_seg = _pad_to(q_seg, 1, t_pad, -1)[:, :, None]
        kv_seg = _pad_to(kv_seg, 1, s_pad, -2)[:, None, :]
    return q, k, v, q_seg, kv_seg


def _kernels(plan):
    """The forward/backward kernel module; the Mosaic GPU forward pairs with Triton's backward."""
    if plan.implementation == "pallas_mosaic_tpu":
        from llmjax.kernels import flash_tpu

        return flash_tpu
    return flash_triton


def _padded_mgpu(t_pad, s_pad, q, k, v, q_seg, kv_seg):
    """The Mosaic GPU kernels' padded inputs: ``[B, T]`` and ``[B, S]`` segment ids, whose
    padding ids (-1, -2) never match a real id or each other."""
    q, k, v = _pad_to(q, 1, t_pad), _pad_to(k, 1, s_pad), _pad_to(v, 1, s_pad)
    if q_seg is not None:
        q_seg, kv_seg = _pad_to(q_seg, 1, t_pad, -1), _pad_to(kv_seg, 1, s_pad, -2)
    return q, k, v, q_seg, kv_seg


def _forward_mgpu(plan, q, k, v, q_seg, kv_seg):
    from llmjax.kernels import flash_mgpu

    t, s = q.shape[1], k.shape[1]
    t_pad = _round_up(t, flash_mgpu.COMPUTE_WGS * flash_mgpu.ROWS)
    s_pad = _round_up(s, flash_mgpu.block_kv(q.shape[3]))
    out, lse = flash_mgpu.forward(
        *_padded_mgpu(t_pad, s_pad, q, k, v, q_seg, kv_seg), spec=plan.spec
    )
    return out[:, :t], lse[:, :, :t]


def _forward(plan, q, k, v, q_seg, kv_seg):
    if plan.implementation == "pallas_mosaic_gpu":
        return _forward_mgpu(plan, q, k, v, q_seg, kv_seg)
    t = q.shape[1]
    qp, kp, vp, qs, ks = _padded(plan, q, k, v, q_seg, kv_seg)
    b = plan.blocks
    out, lse = _kernels(plan).forward(
        qp, kp, vp, qs, ks, spec=plan.spec, bq=b.block_q, bk=b.block_k,
        num_warps=b.num_warps, num_stages=b.num_stages, interpret=plan.interpret,
    )  # fmt: skip
    return out[:, :t], lse[:, :, :t, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(plan, q, k, v, q_seg, kv_seg):
    return _forward(plan, q, k, v, q_seg, kv_seg)


def _flash_fwd(plan, q, k, v, q_seg, kv_seg):
    out, lse = _forward(plan, q, k, v, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(plan, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse = residuals
    do, dlse = cotangents
    t, s = q.shape[1], k.shape[1]
    # delta = rowsum(dO * O); a cotangent on lse enters dS exactly like -delta (d lse/d s = P).
    delta_BTH = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta_BHT = jnp.swapaxes(delta_BTH, 1, 2) - dlse
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # P = exp(s - inf) = 0 on empty rows
    if plan.mosaic_backward:
        grads = _backward_mgpu(plan, q, k, v, q_seg, kv_seg, do, lse_safe, delta_BHT)
        return (*grads, None, None)
    qp, kp, vp, qs, ks = _padded(plan, q, k, v, q_seg, kv_seg)
    t_pad = qp.shape[1]
    stats = jnp.stack([_pad_to(lse_safe, 2, t_pad), _pad_to(delta_BHT, 2, t_pad)], axis=2)
    b = plan.blocks
    dq, dk, dv = _kernels(plan).backward(
        qp, kp, vp, qs, ks, _pad_to(do, 1, t_pad), stats[..., None], spec=plan.spec,
        bq=b.block_q_bwd, bk=b.block_k_bwd, num_warps=b.num_warps_bwd,
        num_stages=b.num_stages_bwd, interpret=plan.interpret,
    )  # fmt: skip
    return dq[:, :t], dk[:, :s], dv[:, :s], None, None


def _backward_mgpu(plan, q, k, v, q_seg, kv_seg, do, lse, delta):
    from llmjax.kernels import flash_mgpu, flash_mgpu_bwd

    t, s, c = q.shape[1], k.shape[1], q.shape[3]
    bk, bq = flash_mgpu_bwd.block_sizes(c)
    t_pad = _round_up(t, max(flash_mgpu.COMPUTE_WGS * flash_mgpu.ROWS, bq))
    s_pad = _round_up(s, max(flash_mgpu.COMPUTE_WGS * flash_mgpu_bwd.KEYS, bk))
    # Padded query rows have dO = 0 and delta = 0, so they add nothing to dK and dV.
    q, k, v, q_seg, kv_seg = _padded_mgpu(t_pad, s_pad, q, k, v, q_seg, kv_seg)
    lse2 = _pad_to(lse * flash_mgpu.LOG2E, 2, t_pad)
    dq, dk, dv = flash_mgpu_bwd.backward(
        q, k, v, _pad_to(do, 1, t_pad), lse2, _pad_to(delta, 2, t_pad), q_seg, kv_seg,
        spec=plan.spec,
    )  # fmt: skip
    return dq[:, :t], dk[:, :s], dv[:, :s]


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B,T,H,C], k = v [B,S,K,C]; got {q.shape}, {k.shape}, {v.shape}"
        )
    b, _, h, c = q.shape
    if k.shape[0] != b or k.shape[3] != c or h % k.shape[2]:
        raise ValueError(f"batch/head dims disagree or K does not divide H: {q.shape}, {k.shape}")


def flash_attention(
    q,
    k,
    v,
    *,
    causal=True,
    sliding_window=None,
    segment_ids=None,
    logit_soft_cap=None,
    scale=None,
    block_sizes=None,
    implementation=None,
    interpret=False,
    return_lse=False,
):
    """Memory-efficient attention; differentiable, with an O(T) recomputing backward.

    Args:
      q: ``[B, T, H, C]``. k, v: ``[B, S, K, C]`` with K dividing H (GQA/MQA).
      causal: key visible iff ``pos_k <= pos_q``; queries are bottom-right aligned
        (query i at position ``i + S - T``).
      sliding_window: w, additionally ``pos_q - pos_k < w``.
      segment_ids: int32 ``[B, T]`` (needs T == S) or ``(q_ids [B, T], kv_ids [B, S])``.
      logit_soft_cap: c, logits become ``c * tanh(logits / c)`` after scaling.
      scale: logit scale, default ``C ** -0.5``.
      block_sizes: ``BlockSizes``; defaults depend on the implementation and head dim.
      implementation: None or "pallas" (by platform), "xla", "pallas_triton",
        "pallas_mosaic_gpu" (Hopper; its own backward for head dims 64 and 128, else
        Triton's; chosen automatically, the Triton backward),
        "pallas_mosaic_tpu".
      interpret: run the Pallas kernel in interpret mode (CPU).
      return_lse: also return the log-sum-exp ``[B, H, T]`` fp32 (-inf on rows that see no key).

    Returns:
      ``[B, T, H, C]`` in q's dtype (and lse if asked). Rows with no visible key are 0.
    """
    _check_shapes(q, k, v)
    t, s, c = q.shape[1], k.shape[1], q.shape[3]
    if segment_ids is not None and not isinstance(segment_ids, tuple | list):
        if t != s:
            raise ValueError("a single segment_ids array needs T == S; pass (q_ids, kv_ids)")
        segment_ids = (segment_ids, segment_ids)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    impl = choose_implementation(implementation, interpret, c, q.dtype)
    auto_gpu = implementation in (None, "pallas") and impl == "pallas_triton" and not interpret
    if auto_gpu and sliding_window is not None:  # see docs/kernels.md, "Known limitations"
        log.warning("flash_attention: sliding_window is not validated on GPU; using XLA")
        impl = "xla"
    if (
        auto_gpu
        and impl == "pallas_triton"
        and segment_ids is None  # the Mosaic segment path is unmeasured on hardware (docs)
        and logit_soft_cap is None  # register budget fix not yet confirmed on a GPU (docs)
        and _unsupported("pallas_mosaic_gpu", c, q.dtype) is None
        and _is_hopper()
    ):
        impl = "pallas_mosaic_gpu"
    if impl == "pallas_mosaic_gpu" and interpret:
        raise ValueError(
            "pallas_mosaic_gpu does not run in interpret mode (the jax 0.10 GPU interpreter "
            "models neither transposed nor register wgmma operands); use pallas_triton"
        )
    if impl == "xla":
        return reference.attention_reference(
            q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
            logit_soft_cap=logit_soft_cap, scale=scale, return_lse=return_lse,
        )  # fmt: skip
    q_seg, kv_seg = (None, None)
    if segment_ids is not None:
        q_seg, kv_seg = (jnp.asarray(x, jnp.int32) for x in segment_ids)
    spec = common.MaskSpec(
        causal=bool(causal),
        window=None if sliding_window is None else int(sliding_window),
        offset=s - t,
        kv_len=s,
        segments=segment_ids is not None,
        soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
        scale=float(c**-0.5 if scale is None else scale),
    )
    blocks = block_sizes or default_block_sizes(impl, c, q.dtype)
    minimum = 128 if impl == "pallas_mosaic_tpu" else 16
    blocks = dataclasses.replace(
        blocks,
        block_q=_fit(blocks.block_q, t, minimum),
        block_q_bwd=_fit(blocks.block_q_bwd, t, minimum),
        block_k=_fit(blocks.block_k, s, minimum),
        block_k_bwd=_fit(blocks.block_k_bwd, s, minimum),
    )
    # Named, "pallas_mosaic_gpu" runs its own backward where it can; chosen automatically, it keeps
    # the Triton backward until the Mosaic one has been measured on hardware (docs/kernels.md).
    mosaic_backward = implementation == "pallas_mosaic_gpu" and _mgpu_backward_ok(c, q.dtype)
    plan = _Plan(spec, impl, blocks, bool(interpret), mosaic_backward)
    out, lse = _flash(plan, q, k, v, q_seg, kv_seg)
    return (out, lse) if return_lse else out
