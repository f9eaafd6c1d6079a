"""GPU-only checks (``-m gpu``): the cuDNN attention path agrees with the XLA reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu():
    if jax.default_backend() != "gpu":
        pytest.fail("the gpu tests need a GPU backend (select them only on a GPU machine)")


@pytest.mark.parametrize("preset", ["llama3-tiny", "mistral-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_matches_xla_in_bf16(preset, packed):
    # cuDNN wants head dims that are multiples of 8 and bf16; the tiny presets qualify.
    cfg = llmjax.build(preset).config.replace(dtype="bfloat16", param_dtype="bfloat16")
    ref_model, cudnn_model = llmjax.build(cfg), llmjax.build(cfg.replace(attention_impl="cudnn"))
    params = ref_model.init(jax.random.key(0))
    x = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
    kw = {}
    if packed:
        kw["segment_ids"] = jnp.asarray([[1] * 20 + [2] * 44, [1] * 64], jnp.int32)
    ref = jax.jit(lambda p, t: ref_model.apply(p, t, **kw))(params, x)
    out = jax.jit(lambda p, t: cudnn_model.apply(p, t, **kw))(params, x)
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) <= 2e-2 * scale
    assert np.isfinite(np.asarray(out)).all()
