"""The Triton and Mosaic GPU kernels compiled for a real GPU, against the reference
(``pytest -m gpu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from llmjax import kernels
from tests.kernels import util

pytestmark = pytest.mark.gpu

CASES = [
    # b, t, s, h, kv, c, opts
    (2, 1024, 1024, 8, 2, 128, dict(causal=True)),
    (1, 1000, 1000, 4, 4, 128, dict(causal=False)),
    (2, 768, 1024, 8, 1, 64, dict(causal=True, sliding_window=200)),
    (1, 512, 512, 4, 1, 256, dict(causal=True, logit_soft_cap=20.0)),
    (2, 1024, 1024, 8, 2, 128, "packed"),
]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("case", CASES)
def test_flash_gpu(case, dtype):
    b, t, s, h, kv, c, opts = case
    if opts == "packed":
        opts = dict(causal=True, segment_ids=util.packed_segments(0, b, t, 5))
    q, k, v, do = util.inputs(1, b, t, s, h, kv, c, dtype)
    util.check_flash(q, k, v, do, opts, implementation="pallas_triton", interpret=False)


MGPU_CASES = [
    # b, t, s, h, kv, c, opts: block-aligned, ragged T/S (padding), T < S, T > S (empty rows)
    (2, 1024, 1024, 8, 2, 128, dict(causal=True)),
    (1, 1000, 1000, 4, 4, 128, dict(causal=False)),
    (2, 768, 1024, 8, 1, 64, dict(causal=True, sliding_window=200)),
    (1, 640, 640, 4, 4, 64, dict(causal=False, sliding_window=100)),
    (1, 512, 512, 4, 1, 256, dict(causal=True, logit_soft_cap=20.0)),
    (1, 300, 700, 8, 8, 64, dict(causal=False)),
    (1, 700, 300, 4, 2, 128, dict(causal=True)),
    (2, 2048, 2048, 8, 8, 256, dict(causal=True)),
    (2, 1024, 1024, 8, 2, 128, "packed"),
    (1, 1000, 1000, 4, 4, 64, "packed-full"),
]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("case", MGPU_CASES)
def test_flash_mgpu_gpu(case, dtype):
    """The Mosaic GPU (Hopper) kernels, forward and backward (Triton's backward at head dim 256)."""
    if jax.devices()[0].compute_capability != "9.0":
        pytest.skip("the Mosaic GPU kernel needs a Hopper GPU (wgmma)")
    b, t, s, h, kv, c, opts = case
    if isinstance(opts, str):  # packed documents, causal or not
        opts = dict(causal=opts == "packed", segment_ids=util.packed_segments(0, b, t, 5))
    q, k, v, do = util.inputs(3, b, t, s, h, kv, c, dtype)
    util.check_flash(q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("window", [None, 100])
def test_decode_gpu(dtype, window):
    b, t, s, h, kv, c = 4, 2, 2048, 32, 8, 128
    q, k, v, _ = util.inputs(2, b, t, s, h, kv, c, dtype)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # heads-major caches
    lengths = jnp.array([2, 700, 2048, 1500], jnp.int32)
    out = kernels.decode_attention(
        q, k, v, lengths, sliding_window=window, implementation="pallas_triton"
    )
    ref = kernels.decode_reference(
        *(x.astype(jnp.float32) for x in (q, k, v)), lengths, sliding_window=window
    )
    util.assert_close(out, ref, dtype, "decode")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_paged_decode_gpu(dtype):
    """The paged layout: 2048 slots per sequence in shuffled 64-slot pages of one pool."""
    b, t, s, h, kv, c, page = 4, 2, 2048, 32, 8, 128, 64
    q, k, v, _ = util.inputs(4, b, t, s, h, kv, c, dtype)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    lengths = jnp.array([2, 700, 2048, 1500], jnp.int32)
    k_pool, v_pool, table = util.paged_caches(0, k, v, lengths, page)
    out = kernels.decode_attention(
        q, k_pool, v_pool, lengths, page_table=table, implementation="pallas_triton"
    )
    ref = kernels.decode_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    util.assert_close(out, ref, dtype, "paged decode")
