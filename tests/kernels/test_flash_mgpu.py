"""The Mosaic GPU (Hopper) flash kernels on CPU, in jax's GPU interpreter as extended by
``mgpu_interpret``: warpgroups as threads, TMA copies completing on barriers, barrier phases
checked, wgmma as an fp32-accumulated product. Compiled numerics run on a Hopper GPU in
``test_gpu.py``; this checks the kernels' logic (ranges, masks, stages, barriers) in every CI run."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tests.kernels import mgpu_interpret, util

pytestmark = pytest.mark.skipif(
    mgpu_interpret.available() is not None, reason=str(mgpu_interpret.available())
)

F16, BF16 = jnp.float16, jnp.bfloat16

FORWARD_CASES = [
    # b, t, s, h, kv, c, dtype, opts: ragged T and S (padding), GQA 4, T < S, T > S (rows that
    # see nothing), windows, soft cap, every head dim, fp16.
    (1, 300, 300, 4, 1, 64, BF16, dict(causal=True)),
    (2, 130, 260, 2, 2, 64, BF16, dict(causal=False)),
    (1, 200, 333, 2, 1, 128, BF16, dict(causal=True, sliding_window=64)),
    (1, 256, 256, 1, 1, 64, BF16, dict(causal=True, logit_soft_cap=5.0)),
    (1, 128, 200, 1, 1, 256, F16, dict(causal=True, sliding_window=100)),
    (1, 300, 100, 2, 1, 128, BF16, dict(causal=True)),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_mgpu_forward_interpreted(case):
    b, t, s, h, kv, c, dtype, opts = case
    q, k, v, do = util.inputs(5, b, t, s, h, kv, c, dtype)
    with mgpu_interpret.extended():
        util.check_flash(
            q, k, v, do, opts, implementation="pallas_mosaic_gpu", interpret=False, grads=False
        )
