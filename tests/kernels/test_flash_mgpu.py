"""The Mosaic GPU (Hopper) flash kernels on CPU, in jax's GPU interpreter as extended by
``mgpu_interpret``: warpgroups as threads, TMA copies completing on barriers, barrier phases
checked, wgmma as an fp32-accumulated product. Compiled numerics run on a Hopper GPU in
``test_gpu.py``; this checks the kernels' logic (ranges, masks, stages, barriers) in every CI run."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from llmjax import kernels
from tests.kernels import mgpu_interpret, util

pytestmark = pytest.mark.skipif(
    mgpu_interpret.available() is not None, reason=str(mgpu_interpret.available())
)

F16, BF16 = jnp.float16, jnp.bfloat16
# The interpreter runs a 128-row tile in seconds; the longer cases run with the slow tests.
slow = functools.partial(pytest.param, marks=pytest.mark.slow)

FORWARD_CASES = [
    # b, t, s, h, kv, c, dtype, opts: ragged T and S (padding), GQA 4, T < S, T > S (rows that
    # see nothing), windows, soft cap, every head dim, fp16. The backward cases check the output
    # too, so the forward's default run only adds head dim 256.
    slow((1, 200, 200, 4, 1, 64, BF16, dict(causal=True))),
    slow((2, 130, 260, 2, 2, 64, BF16, dict(causal=False))),
    slow((1, 200, 333, 2, 1, 128, BF16, dict(causal=True, sliding_window=64))),
    slow((1, 256, 256, 1, 1, 64, BF16, dict(causal=True, logit_soft_cap=5.0))),
    (1, 128, 200, 1, 1, 256, F16, dict(causal=True, sliding_window=100)),
    slow((1, 300, 100, 2, 1, 128, BF16, dict(causal=True))),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_mgpu_forward_interpreted(case):
    b, t, s, h, kv, c, dtype, opts = case
    q, k, v, do = util.inputs(5, b, t, s, h, kv, c, dtype)
    with mgpu_interpret.extended():
        util.check_flash(
            q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False, grads=False
        )


BACKWARD_CASES = [
    # b, t, s, h, kv, c, dtype, opts: as the forward's, plus GQA 4 over several key tiles (the
    # dK/dV kernel sums heads in registers) and a window narrower than a block.
    (1, 200, 200, 4, 1, 64, BF16, dict(causal=True)),
    slow((2, 130, 260, 2, 2, 64, BF16, dict(causal=False))),
    slow((1, 200, 333, 2, 1, 128, BF16, dict(causal=True, sliding_window=64))),
    (1, 256, 256, 1, 1, 64, BF16, dict(causal=True, logit_soft_cap=5.0)),
    slow((1, 128, 200, 1, 1, 128, F16, dict(causal=True, sliding_window=20))),
    slow((1, 300, 100, 2, 1, 128, BF16, dict(causal=True))),
    slow((1, 512, 512, 1, 1, 64, BF16, dict(causal=True, sliding_window=200))),
    slow((1, 384, 384, 1, 1, 64, BF16, dict(causal=False, sliding_window=150))),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_mgpu_backward_interpreted(case):
    b, t, s, h, kv, c, dtype, opts = case
    q, k, v, do = util.inputs(6, b, t, s, h, kv, c, dtype)
    with mgpu_interpret.extended():
        util.check_flash(q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False)


def _packed(seed, b, n, docs, order):
    """Packed document ids, renumbered by ``order`` so that they are not sorted."""
    return jnp.asarray(order, jnp.int32)[util.packed_segments(seed, b, n, docs)]


SEGMENT_CASES = [
    # b, t, s, h, kv, c, dtype, causal, window: short documents in several 64-row tiles, GQA,
    # a window inside documents, and T != S with separate query and key ids (rows whose document
    # has no key give 0 and lse -inf).
    (1, 256, 256, 2, 1, 64, BF16, True, None),
    slow((2, 200, 200, 4, 2, 128, BF16, False, None)),
    slow((1, 320, 320, 1, 1, 64, F16, True, 48)),
    slow((1, 130, 300, 2, 1, 64, BF16, False, None)),
]


@pytest.mark.parametrize("case", SEGMENT_CASES, ids=str)
def test_mgpu_segments_interpreted(case):
    b, t, s, h, kv, c, dtype, causal, window = case
    q, k, v, do = util.inputs(7, b, t, s, h, kv, c, dtype)
    if t == s:
        ids = _packed(8, b, t, 5, [3, 0, 4, 1, 2])
    else:  # key document 2 is missing: its queries see nothing
        ids = (_packed(8, b, t, 3, [0, 2, 1]), _packed(9, b, s, 3, [0, 1, 3]))
    opts = dict(causal=causal, sliding_window=window, segment_ids=ids)
    with mgpu_interpret.extended():
        util.check_flash(q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False)


@pytest.mark.parametrize("causal", [True, slow(False)])
def test_mgpu_other_documents_blocks_are_never_read(causal):
    """Three block-aligned documents, the middle one's keys and values NaN: the outer documents'
    outputs and gradients are exact only if no Mosaic kernel (forward, dQ, dK/dV) loads the middle
    one's blocks, before them (the last document's rows) or after them (the first's keys, whose
    dK/dV pass would meet the middle rows' NaN statistics); masking alone would multiply zero
    probabilities by NaN."""
    b, t, h, kv, c, n = 1, 384, 2 if not causal else 1, 1, 128, 128
    seg = (jnp.arange(t)[None] // n).astype(jnp.int32)
    q, k, v, do = util.inputs(13, b, t, t, h, kv, c, BF16)
    poison = (seg == 1)[:, :, None, None]
    k_nan, v_nan = (jnp.where(poison, jnp.nan, x).astype(BF16) for x in (k, v))
    opts = dict(causal=causal, segment_ids=seg)

    def grads(impl, k, v, up=False):
        f = lambda q, k, v: kernels.flash_attention(q, k, v, implementation=impl, **opts)
        args = [x.astype(jnp.float32) for x in (q, k, v)] if up else (q, k, v)
        out, vjp = jax.vjp(f, *args)
        return jax.block_until_ready((out, *vjp(do.astype(out.dtype))))

    with mgpu_interpret.extended():
        got = grads("pallas_mosaic_gpu", k_nan, v_nan)
    want = grads("xla", k, v, up=True)
    outer = jnp.concatenate([jnp.arange(n), jnp.arange(2 * n, t)])
    for name, x, ref in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        util.assert_close(x[:, outer], ref[:, outer], BF16, name)
