"""The Mosaic GPU (Hopper) flash kernels on CPU, in jax's GPU interpreter as extended by
``mgpu_interpret``: warpgroups as threads, TMA copies completing on barriers, barrier phases
checked, wgmma as an fp32-accumulated product. Compiled numerics run on a Hopper GPU in
``test_gpu.py``; this checks the kernels' logic (ranges, masks, stages, barriers) in every CI run."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import pytest

from tests.kernels import mgpu_interpret, util

pytestmark = pytest.mark.skipif(
    mgpu_interpret.available() is not None, reason=str(mgpu_interpret.available())
)

F16, BF16 = jnp.float16, jnp.bfloat16
# The interpreter runs a 128-row tile in seconds; the longer cases run with the slow tests.
slow = functools.partial(pytest.param, marks=pytest.mark.slow)

FORWARD_CASES = [
    # b, t, s, h, kv, c, dtype, opts: ragged T and S (padding), GQA 4, T < S, T > S (rows that
    # see nothing), windows, soft cap, every head dim, fp16.
    (1, 200, 200, 4, 1, 64, BF16, dict(causal=True)),
    slow((2, 130, 260, 2, 2, 64, BF16, dict(causal=False))),
    slow((1, 200, 333, 2, 1, 128, BF16, dict(causal=True, sliding_window=64))),
    (1, 256, 256, 1, 1, 64, BF16, dict(causal=True, logit_soft_cap=5.0)),
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
    (1, 300, 100, 2, 1, 128, BF16, dict(causal=True)),
    (1, 512, 512, 1, 1, 64, BF16, dict(causal=True, sliding_window=200)),
    slow((1, 384, 384, 1, 1, 64, BF16, dict(causal=False, sliding_window=150))),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_mgpu_backward_interpreted(case):
    b, t, s, h, kv, c, dtype, opts = case
    q, k, v, do = util.inputs(6, b, t, s, h, kv, c, dtype)
    with mgpu_interpret.extended():
        util.check_flash(q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False)
