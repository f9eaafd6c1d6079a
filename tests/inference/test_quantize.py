"""Weight-only quantization: exact format bounds, logits close to float, memory, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.inference import generate
from llmjax.inference.quantize import (
    QuantizedModel,
    QuantizedTensor,
    dequantize,
    param_bytes,
    quantize,
)

# Relative logit error (max |diff| / max |logit|). A weight's rounding error is at most half a
# step: max|w| / 254 of its channel for int8 (0.4%), max|w| / 14 of its group for int4. The errors
# of a few layers add up, through norms and soft-caps: int8 is allowed 5 half-steps (2%), and int4
# the same bound scaled by the ratio of the steps, 254 / 14 (about 18, so 36%).
INT8_BOUND = 5 / 254
INT4_BOUND = INT8_BOUND * 254 / 14


@pytest.fixture(scope="module", params=["llama3-tiny", "gemma2-tiny"])
def tiny(request):
    model = llmjax.build(request.param)
    return model, model.init(jax.random.key(0))


def _flat(tree):
    is_q = lambda x: isinstance(x, QuantizedTensor)
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_every_weight_is_within_half_a_step(tiny, mode, group):
    model, params = tiny
    q = quantize(model, params, mode, group or 64)
    deq = dequantize(q)
    n_quantized = 0
    for (path, w), (_, qt), (_, d) in zip(_flat(params), _flat(q), _flat(deq), strict=True):
        if not isinstance(qt, QuantizedTensor):
            assert qt is w  # embeddings, norms and biases are left alone
            continue
        n_quantized += 1
        assert d.shape == w.shape and d.dtype == w.dtype
        w2 = np.asarray(jnp.transpose(w, qt.perm)).reshape(-1, np.asarray(qt.scale).shape[-1])
        err = np.abs(w2 - np.asarray(jnp.transpose(d, qt.perm)).reshape(w2.shape))
        if mode == "int8":
            step = np.asarray(qt.scale)  # [1, O]
        else:
            step = np.repeat(np.asarray(qt.scale)[:, 0], group, axis=0)  # [I, O]
        assert (err <= step / 2 + 1e-7).all(), jax.tree_util.keystr(path)
    cfg = model.config  # q, k, v, o, up, down (+ gate) per layer, + an untied head
    assert n_quantized == (6 + cfg.gated_mlp) * cfg.n_layers + (not cfg.tie_embeddings)


def test_int8_and_int4_logits_are_close_to_float(tiny):
    model, params = tiny
    x = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
    ref = model.apply(params, x)
    qm = QuantizedModel(model)
    errs = {}
    for mode, group in (("int8", 64), ("int4", 32)):
        out = jax.jit(qm.apply)(quantize(model, params, mode, group), x)
        errs[mode] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert errs["int8"] < INT8_BOUND, errs
    assert errs["int4"] < INT4_BOUND, errs
    assert errs["int8"] < errs["int4"]


def test_quantized_weights_take_less_memory(tiny):
    model, params = tiny
    linear = lambda t: sum(
        x.nbytes for _, x in _flat(t) if isinstance(x, QuantizedTensor) or x.ndim >= 2
    )
    float_bytes = param_bytes(params)
    q8, q4 = quantize(model, params, "int8"), quantize(model, params, "int4", 64)
    lin8 = sum(x.nbytes for _, x in _flat(q8) if isinstance(x, QuantizedTensor))
    lin4 = sum(x.nbytes for _, x in _flat(q4) if isinstance(x, QuantizedTensor))
    lin_f = linear(params) - sum(
        x.nbytes for (_, x), (_, y) in zip(_flat(params), _flat(q8), strict=True)
        if x.ndim >= 2 and not isinstance(y, QuantizedTensor)
    )  # fmt: skip
    assert lin8 < 0.27 * lin_f and lin4 < 0.16 * lin_f  # 1/4 and 1/8 plus the scales
    assert param_bytes(q4) < param_bytes(q8) < float_bytes


def test_generate_with_quantized_weights(tiny):
    model, params = tiny
    ref = generate(model, params, [[1, 2, 3]], max_new_tokens=6)
    out = generate(
        QuantizedModel(model), quantize(model, params, "int8"), [[1, 2, 3]], max_new_tokens=6
    )
    assert out.lengths == [6]
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=0.05)


def test_bad_group_size_is_refused(tiny):
    model, params = tiny
    with pytest.raises(ValueError, match="group_size"):
        quantize(model, params, "int4", 48)
    with pytest.raises(ValueError, match="mode"):
        quantize(model, params, "int2")
