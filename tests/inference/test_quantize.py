"""Weight-only quantization: exact format bounds, logits close to float, memory, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import InputError
from llmjax.inference import generate
from llmjax.inference.quantize import (
    NF4_LEVELS,
    QuantizedModel,
    QuantizedTensor,
    dequantize,
    param_bytes,
    quantize,
    quantize_tensor,
)

# Relative logit error (max |diff| / max |logit|). A weight's rounding error is at most half a
# step: max|w| / 254 of its channel for int8 (0.4%), max|w| / 14 of its group for int4. The errors
# of a few layers add up, through norms and soft-caps: int8 is allowed 5 half-steps (2%), and int4
# the same bound scaled by the ratio of the steps, 254 / 14 (about 18, so 36%).
INT8_BOUND = 5 / 254
INT4_BOUND = INT8_BOUND * 254 / 14
# NF4 rounds to the nearest of 16 uneven levels in [-1, 1] x max|w| of the block: at worst half the
# widest gap, (1 - 0.7229568) / 2 of max|w| (between the top two levels), against int8's 1 / 254.
NF4_BOUND = INT8_BOUND * 254 * (NF4_LEVELS[-1] - NF4_LEVELS[-2]) / 2


@pytest.fixture(scope="module", params=["llama3-tiny", "gemma2-tiny"])
def tiny(request):
    model = llmjax.build(request.param, scan_layers=False)  # per layer; stacked: test_scan.py
    return model, model.init(jax.random.key(0))


def _flat(tree):
    is_q = lambda x: isinstance(x, QuantizedTensor)
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_q)[0]


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("nf4", 32)])
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
        if mode == "nf4":  # the nearest level: no level is closer to w / max|w| than the chosen
            x = w2 / step
            nearest = np.abs(x[..., None] - NF4_LEVELS).min(-1)
            assert (err / step <= nearest + 1e-6).all(), jax.tree_util.keystr(path)
            continue
        assert (err <= step / 2 + 1e-7).all(), jax.tree_util.keystr(path)
    cfg = model.config  # q, k, v, o, up, down (+ gate) per layer, + an untied head
    assert n_quantized == (6 + cfg.gated_mlp) * cfg.n_layers + (not cfg.tie_embeddings)


def test_keep_leaves_the_matching_weights_as_they_are(tiny):
    model, params = tiny
    q = quantize(model, params, "nf4", 32, keep=r"lm_head|layers\.0\.attn\.w[qk]")
    assert q.get("lm_head") is params.get("lm_head")  # absent when tied to the embedding
    assert q["layers"][0]["attn"]["wq"] is params["layers"][0]["attn"]["wq"]
    assert q["layers"][0]["attn"]["wk"] is params["layers"][0]["attn"]["wk"]
    assert isinstance(q["layers"][0]["attn"]["wv"], QuantizedTensor)
    assert isinstance(q["layers"][1]["attn"]["wq"], QuantizedTensor)
    with pytest.raises(InputError, match="not a regular expression"):
        quantize(model, params, "nf4", 32, keep="lm_head(")


def test_int8_and_int4_logits_are_close_to_float(tiny):
    model, params = tiny
    x = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 24)), jnp.int32)
    ref = model.apply(params, x)
    qm = QuantizedModel(model)
    errs = {}
    for mode, group in (("int8", 64), ("int4", 32), ("nf4", 32)):
        out = jax.jit(qm.apply)(quantize(model, params, mode, group), x)
        errs[mode] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert errs["int8"] < INT8_BOUND, errs
    assert errs["int4"] < INT4_BOUND, errs
    assert errs["nf4"] < NF4_BOUND, errs
    assert errs["int8"] < min(errs["int4"], errs["nf4"])


def test_quantized_weights_take_less_memory(tiny):
    model, params = tiny
    linear = lambda t: sum(
        x.nbytes for _, x in _flat(t) if isinstance(x, QuantizedTensor) or x.ndim >= 2
    )
    float_bytes = param_bytes(params)
    q8, q4 = quantize(model, params, "int8"), quantize(model, params, "int4", 64)
    lin8 = sum(x.nbytes for _, x in _flat(q8) if isinstance(x, QuantizedTensor))
    lin4 = sum(x.nbytes for _, x in _flat(q4) if isinstance(x, QuantizedTensor))
    nf4 = quantize(model, params, "nf4", 64)
    assert param_bytes(nf4) == param_bytes(q4)  # the same blocks, nibbles and scales
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
    with pytest.raises(ValueError, match="nf4 group_size=48: must be even and divide"):
        quantize(model, params, "nf4", 48)
    with pytest.raises(ValueError, match="mode"):
        quantize(model, params, "int2")


def test_nf4_levels_are_normal_quantiles():
    """The published levels: 8 positive and 7 negative quantiles of N(0, 1) and 0, scaled to 1.

    The quantile probabilities run from (1 - 1/30 + 1 - 1/32) / 2 (as in QLoRA) to 1/2; the
    published table was computed from a float32 grid, hence the two-ulp tolerance.
    """
    from statistics import NormalDist

    ppf, top = NormalDist().inv_cdf, 0.9677083
    pos = [ppf(p) for p in np.linspace(top, 0.5, 9)[:-1]]
    neg = [-ppf(p) for p in np.linspace(top, 0.5, 8)[:-1]]
    levels = np.sort(np.array(pos + neg + [0.0]))
    levels /= levels.max()
    assert NF4_LEVELS.dtype == np.float32 and NF4_LEVELS.shape == (16,)
    assert np.abs(levels - NF4_LEVELS).max() <= 2 * 2.0**-23


def _gaussian(shape=(512, 256), seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_nf4_beats_int4_on_gaussian_weights():
    """Same blocks and bytes; NF4's levels follow the weights' distribution, int4's are even.

    Measured on 4M standard normal values: RMS error relative to int4 0.90 (blocks of 32), 0.85
    (64), 0.81 (128). (On truncated-normal weights, as model.init draws them, NF4 is no better:
    the tails NF4 spends levels on are cut off.)
    """
    w = _gaussian()
    for group, ratio in ((32, 0.92), (64, 0.88), (128, 0.84)):
        rms = {
            mode: float(
                jnp.sqrt(jnp.mean((quantize_tensor(w, (0,), mode, group).dequantize() - w) ** 2))
            )
            for mode in ("int4", "nf4")
        }
        assert rms["nf4"] < ratio * rms["int4"], (group, rms)


def test_nf4_packing_and_bytes():
    w = _gaussian((256, 48), seed=1)
    qt = quantize_tensor(w, (0,), "nf4", 64)
    assert qt.q.dtype == jnp.uint8 and qt.q.shape == (4, 32, 48) and qt.scale.shape == (4, 1, 48)
    assert qt.nbytes == w.size // 2 + 4 * w.size // 64  # half a byte a value, a float per block
    # Two codes a byte, low nibble first, each the nearest level to w / max|w| of its block.
    blocks = np.asarray(w).reshape(4, 64, 48)
    x = blocks / np.abs(blocks).max(axis=1, keepdims=True)
    codes = np.abs(x[..., None] - NF4_LEVELS).argmin(-1)
    q = np.asarray(qt.q)
    assert np.array_equal(np.stack([q & 0xF, q >> 4], axis=2).reshape(4, 64, 48), codes)
    # Dequantized values are levels x scales, so quantizing them again changes nothing.
    again = quantize_tensor(qt.dequantize(), (0,), "nf4", 64)
    assert np.array_equal(again.q, qt.q) and np.array_equal(again.scale, qt.scale)
    # A multi-dim weight (attention output [H, C, D], input H x C) keeps its shape and layout.
    w3 = _gaussian((4, 16, 24), seed=2)
    qt3 = quantize_tensor(w3, (0, 1), "nf4", 32)
    assert qt3.dequantize().shape == w3.shape
    flat = quantize_tensor(w3.reshape(64, 24), (0,), "nf4", 32)
    assert np.array_equal(qt3.dequantize().reshape(64, 24), flat.dequantize())
