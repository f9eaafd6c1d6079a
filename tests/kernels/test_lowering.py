"""Cross-lowering for TPU (Mosaic) and GPU (Triton, Mosaic GPU) on a CPU-only jaxlib.

Lowering runs the backend's Pallas lowering in Python, which is where bad block shapes,
non-power-of-two Triton tiles and unsupported ops fail. For Triton we also run the MLIR verifier
on each kernel module, which catches ill-typed ops that otherwise only fail when the GPU plugin
parses the module. Mosaic's own compiler passes (layouts, VMEM limits) run only on a TPU host.
Mosaic GPU lowers all the way to its LLVM/NVVM module here, shared-memory budget included; only
PTX compilation needs the GPU.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest

from llmjax import kernels


@contextlib.contextmanager
def verified_triton_modules():
    """Run the MLIR verifier on every Triton module lowered inside the block; count them."""
    from jax._src.pallas.triton import lowering

    original = lowering.lower_jaxpr_to_triton_module
    seen = []

    def checked(*args, **kwargs):
        result = original(*args, **kwargs)
        assert result.module.operation.verify()
        seen.append(result)
        return result

    lowering.lower_jaxpr_to_triton_module = checked
    try:
        yield seen
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def _train_step(implementation, opts):
    def loss(q, k, v):
        out = kernels.flash_attention(q, k, v, implementation=implementation, **opts)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


OPTION_SETS = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "window-softcap": dict(causal=True, sliding_window=300, logit_soft_cap=30.0),
    "segments": dict(causal=True, segment_ids=jnp.zeros((2, 1024), jnp.int32)),
}


def _args(dtype, c, t=1024, s=1024, h=8, kv=2):
    return (
        jnp.zeros((2, t, h, c), dtype),
        jnp.zeros((2, s, kv, c), dtype),
        jnp.zeros((2, s, kv, c), dtype),
    )


@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=str)
def test_tpu_flash_lowers(opts, dtype, c):
    lowered = (
        jax.jit(_train_step("pallas_mosaic_tpu", OPTION_SETS[opts]))
        .trace(*_args(dtype, c))
        .lower(lowering_platforms=("tpu",))
    )
    assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dQ, dK/dV


@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("opts", list(OPTION_SETS), ids=str)
def test_gpu_flash_lowers(opts, dtype, c):
    with verified_triton_modules() as modules:
        jax.jit(_train_step("pallas_triton", OPTION_SETS[opts])).trace(*_args(dtype, c)).lower(
            lowering_platforms=("cuda",)
        )
    assert len(modules) == 3


def test_gpu_lowering_rejects_bad_tiles():
    """The check above has teeth: a tile that is not a power of two fails to lower."""
    blocks = kernels.BlockSizes(48, 64, 64, 64)
    f = lambda q, k, v: kernels.flash_attention(
        q, k, v, implementation="pallas_triton", block_sizes=blocks
    )
    with pytest.raises(ValueError, match="power of 2"):
        jax.jit(f).trace(*_args(jnp.bfloat16, 128)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_decode_lowers(dtype, c):
    q = jnp.zeros((4, 2, 32, c), dtype)
    cache = jnp.zeros((4, 8, 4096, c), dtype)
    lengths = jnp.full((4,), 100, jnp.int32)
    for impl, platform in (("pallas_mosaic_tpu", "tpu"), ("pallas_triton", "cuda")):
        f = lambda q, k, v, n, impl=impl: kernels.decode_attention(
            q, k, v, n, sliding_window=512, implementation=impl
        )
        with verified_triton_modules() as modules:
            jax.jit(f).trace(q, cache, cache, lengths).lower(lowering_platforms=(platform,))
        assert len(modules) == (1 if platform == "cuda" else 0)


@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_paged_decode_lowers(dtype, c):
    """A pool whose page count is not a power of two, 3 sequences, 16-slot pages."""
    q = jnp.zeros((3, 2, 32, c), dtype)
    pool = jnp.zeros((8, 1000, 16, c), dtype)
    table = jnp.zeros((3, 300), jnp.int32)
    lengths = jnp.full((3,), 100, jnp.int32)
    for impl, platform in (("pallas_mosaic_tpu", "tpu"), ("pallas_triton", "cuda")):
        f = lambda q, k, v, n, p, impl=impl: kernels.decode_attention(
            q, k, v, n, page_table=p, sliding_window=512, implementation=impl
        )
        with verified_triton_modules() as modules:
            jax.jit(f).trace(q, pool, pool, lengths, table).lower(lowering_platforms=(platform,))
        assert len(modules) == (1 if platform == "cuda" else 0)


MGPU_OPTION_SETS = {
    **{k: v for k, v in OPTION_SETS.items() if k != "segments"},
    # T != S below: separate query and key ids.
    "segments": dict(
        causal=True,
        segment_ids=(jnp.zeros((2, 1000), jnp.int32), jnp.zeros((2, 1100), jnp.int32)),
    ),
}


@pytest.mark.parametrize("c", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("opts", list(MGPU_OPTION_SETS), ids=str)
def test_mosaic_gpu_flash_lowers(opts, dtype, c):
    """The Hopper forward and backward (Mosaic GPU kernels: forward, dQ, dK/dV; Triton's dQ and
    dK/dV at head dim 256), with T and S that are not multiples of the blocks, GQA and packed
    documents."""
    with verified_triton_modules() as modules:
        lowered = (
            jax.jit(_train_step("pallas_mosaic_gpu", MGPU_OPTION_SETS[opts]))
            .trace(*_args(dtype, c, t=1000, s=1100))
            .lower(lowering_platforms=("cuda",))
        )
    mosaic_kernels = lowered.as_text().count("@mosaic_gpu_v2")  # one custom call per kernel
    assert (mosaic_kernels, len(modules)) == ((1, 2) if c == 256 else (3, 0))


def test_mosaic_gpu_lowering_checks_shared_memory():
    """The check above has teeth: K/V stages that overflow shared memory fail to lower."""
    from llmjax.kernels import common, flash_mgpu

    spec = common.MaskSpec(True, None, 0, 1024, False, None, 0.0625)
    q = jnp.zeros((1, 1024, 4, 256), jnp.bfloat16)
    f = lambda q, k, v: flash_mgpu.forward(q, k, v, spec=spec, bk=128, stages=2)
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(f).trace(q, q, q).lower(lowering_platforms=("cuda",))


def test_mosaic_gpu_rejects_interpret_mode():
    q = jnp.zeros((2, 256, 4, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="interpret"):
        kernels.flash_attention(q, q, q, implementation="pallas_mosaic_gpu", interpret=True)


def test_mosaic_gpu_rejects_fp32():
    q = jnp.zeros((2, 256, 4, 128), jnp.float32)
    with pytest.raises(ValueError, match="bf16/fp16"):
        kernels.flash_attention(q, q, q, implementation="pallas_mosaic_gpu")
