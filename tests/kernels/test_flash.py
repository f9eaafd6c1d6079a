"""Flash attention kernels in interpret mode vs the XLA reference: outputs, lse and gradients."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmjax import kernels
from tests.kernels import util

SMALL = kernels.BlockSizes(32, 32, 16, 32)  # several blocks per axis even for short sequences
BF16, F32 = jnp.bfloat16, jnp.float32

# b, t, s, h, kv, c, options. Lengths are deliberately not multiples of the blocks.
TRITON_CASES = {
    "causal-gqa4": (2, 50, 50, 8, 2, 64, dict(causal=True)),
    "full-mqa": (1, 40, 40, 8, 1, 64, dict(causal=False)),
    "causal-t<s": (1, 24, 70, 4, 4, 64, dict(causal=True)),
    "causal-t>s": (1, 70, 40, 4, 2, 64, dict(causal=True)),
    "full-t<s": (2, 20, 45, 4, 1, 64, dict(causal=False)),
    "window": (1, 60, 60, 8, 1, 64, dict(causal=True, sliding_window=9)),
    "window-t<s": (1, 33, 80, 4, 4, 64, dict(causal=True, sliding_window=17)),
    "window-noncausal": (1, 48, 48, 2, 2, 64, dict(causal=False, sliding_window=5)),
    "softcap": (1, 40, 40, 4, 2, 128, dict(causal=True, logit_soft_cap=2.0)),
    "head256": (1, 36, 36, 2, 1, 256, dict(causal=True)),
    "head128-gqa8": (1, 40, 40, 8, 1, 128, dict(causal=True, sliding_window=20)),
    "scale": (1, 30, 30, 2, 1, 64, dict(causal=False, scale=0.3, logit_soft_cap=1.5)),
}


# bf16 on the cases whose structure differs most; fp32 everywhere (tight tolerance).
BF16_CASES = ("causal-gqa4", "causal-t<s", "window", "softcap", "head256")
SLOW_CASES = ("full-t<s", "scale", "head128-gqa8")  # covered in spirit by the others
TRITON_PARAMS = [
    pytest.param(c, F32, marks=[pytest.mark.slow] if c in SLOW_CASES else []) for c in TRITON_CASES
] + [(c, BF16) for c in BF16_CASES]


@pytest.mark.parametrize(("case", "dtype"), TRITON_PARAMS, ids=lambda x: getattr(x, "__name__", x))
def test_triton_kernel_matches_reference(case, dtype):
    b, t, s, h, kv, c, opts = TRITON_CASES[case]
    q, k, v, do = util.inputs(zlib.crc32(repr(case).encode()) % 1000, b, t, s, h, kv, c, dtype)
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_triton", interpret=True, block_sizes=SMALL
    )


@pytest.mark.parametrize(("dtype", "window"), [(F32, None), (BF16, 13)], ids=["f32", "bf16-window"])
def test_packed_documents(dtype, window):
    b, t, h, kv, c = 2, 64, 4, 1, 64
    seg = util.packed_segments(3, b, t, docs=4)
    q, k, v, do = util.inputs(4, b, t, t, h, kv, c, dtype)
    opts = dict(causal=True, segment_ids=seg, sliding_window=window)
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_triton", interpret=True, block_sizes=SMALL
    )


def test_segment_block_bounds():
    """Block ranges from id ranges: exact for contiguous documents, empty when no id meets."""
    from llmjax.kernels.common import segment_block_bounds

    ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 2]], jnp.int32)  # blocks of 2: 0|1|1,2|2
    kv_bounds, q_bounds = segment_block_bounds(ids, ids, 2, 2)
    assert kv_bounds[0].tolist() == [[0, 1], [1, 3], [1, 4], [2, 4]]
    assert q_bounds[0].tolist() == [[0, 1], [1, 3], [1, 4], [2, 4]]
    q_ids = jnp.asarray([[7, 7, 0, 0]], jnp.int32)  # id 7 has no key
    kv_bounds, q_bounds = segment_block_bounds(q_ids, ids, 2, 2)
    assert kv_bounds[0].tolist() == [[0, 0], [0, 1]]
    assert q_bounds[0].tolist() == [[1, 2], [0, 0], [0, 0], [0, 0]]
    # Packed documents: the range is exactly the key blocks sharing an id, far fewer than all.
    seg = np.asarray(util.packed_segments(0, 4, 256, 8))
    kv_bounds, _ = segment_block_bounds(jnp.asarray(seg), jnp.asarray(seg), 32, 32)
    blocks = seg.reshape(4, 8, 32)
    for bi in range(4):
        for i in range(8):
            shared = [j for j in range(8) if set(blocks[bi, i]) & set(blocks[bi, j])]
            assert kv_bounds[bi, i].tolist() == [shared[0], shared[-1] + 1]
    assert float((kv_bounds[..., 1] - kv_bounds[..., 0]).mean()) < 4.0


@pytest.mark.parametrize("causal", [True, False])
def test_many_documents_skip_blocks(causal):
    """Short documents with shuffled (unsorted) ids: skipped blocks never hide a visible key."""
    b, t, h, kv, c = 2, 160, 4, 2, 64
    seg = util.packed_segments(6, b, t, docs=9)
    seg = jnp.asarray([5, 2, 8, 0, 7, 1, 4, 3, 6], jnp.int32)[seg]  # ids out of order
    q, k, v, do = util.inputs(7, b, t, t, h, kv, c, F32)
    opts = dict(causal=causal, segment_ids=seg)
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_triton", interpret=True, block_sizes=SMALL
    )


def test_tpu_many_documents_skip_blocks():
    """The TPU kernels' scalar-prefetched bounds on unsorted ids, with 128-row blocks."""
    b, t, h, kv, c = 1, 640, 2, 1, 128
    seg = util.packed_segments(11, b, t, docs=7)
    seg = jnp.asarray([3, 0, 6, 1, 5, 2, 4], jnp.int32)[seg]
    q, k, v, do = util.inputs(12, b, t, t, h, kv, c, F32)
    util.check_flash(
        q, k, v, do, dict(causal=True, segment_ids=seg), implementation="pallas_mosaic_tpu",
        interpret=True, block_sizes=TPU_BLOCKS,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("implementation", "block"), [("pallas_triton", 32), ("pallas_mosaic_tpu", 128)]
)
@pytest.mark.parametrize("causal", [True, False])
def test_other_documents_blocks_are_never_read(implementation, block, causal):
    """Keys and values of the second of two block-aligned documents are NaN: the first document's
    output and gradients stay finite and exact only if no kernel touches the second's blocks (a
    masked block still multiplies its zero probabilities by the NaN values)."""
    b, t, h, kv, c = 1, 4 * block, 2, 1, 128
    seg = jnp.asarray([[0] * (2 * block) + [1] * (2 * block)], jnp.int32)
    q, k, v, do = util.inputs(13, b, t, t, h, kv, c, F32)
    poison = jnp.arange(t)[None, :, None, None] >= 2 * block
    k_nan, v_nan = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    blocks = kernels.BlockSizes(block, block, block, block)
    opts = dict(causal=causal, segment_ids=seg)

    def run(impl, k, v, **kw):
        out, vjp = jax.vjp(
            lambda q, k, v: kernels.flash_attention(q, k, v, implementation=impl, **opts, **kw),
            q, k, v,
        )  # fmt: skip
        return (out, *vjp(do))

    got = run(implementation, k_nan, v_nan, interpret=True, block_sizes=blocks)
    want = run("xla", k, v)
    first = slice(0, 2 * block)
    for name, x, ref in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        util.assert_close(x[:, first], ref[:, first], F32, name)


def test_separate_q_and_kv_segments_with_empty_rows():
    """Queries whose segment has no key (and T != S) give 0 output, -inf lse, finite grads."""
    b, t, s, h, kv, c = 1, 20, 40, 4, 2, 64
    q_seg = jnp.asarray([[0] * 8 + [7] * 4 + [1] * 8], jnp.int32)  # id 7 never occurs in keys
    kv_seg = jnp.asarray([[0] * 25 + [1] * 15], jnp.int32)
    q, k, v, do = util.inputs(5, b, t, s, h, kv, c, F32)
    opts = dict(causal=False, segment_ids=(q_seg, kv_seg))
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_triton", interpret=True, block_sizes=SMALL
    )
    out, lse = kernels.flash_attention(
        q, k, v, implementation="pallas_triton", interpret=True, return_lse=True, **opts
    )
    assert float(jnp.abs(out[:, 8:12]).max()) == 0.0
    assert bool(jnp.all(jnp.isneginf(lse[:, :, 8:12])))


def test_lse_cotangent():
    """A loss on the returned lse is differentiated through the kernel's backward too."""

    q, k, v, _ = util.inputs(6, 1, 40, 40, 4, 2, 64, F32)

    def loss(fn):
        def f(q, k, v):
            out, lse = fn(q, k, v)
            return jnp.sum(out * out) + jnp.sum(jnp.sin(lse))

        return f

    kern = loss(
        lambda q, k, v: kernels.flash_attention(
            q,
            k,
            v,
            implementation="pallas_triton",
            interpret=True,
            return_lse=True,
            block_sizes=SMALL,
        )  # fmt: skip
    )
    ref = loss(lambda q, k, v: kernels.attention_reference(q, k, v, return_lse=True))
    grads, grads_r = jax.grad(kern, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)
    for g, g_r in zip(grads, grads_r, strict=True):
        util.assert_close(g, g_r, F32, "grad through lse")


# The TPU kernels run in the generic interpreter; blocks are at least 128 there, so these use
# lengths that span two or three blocks.
TPU_BLOCKS = kernels.BlockSizes(128, 128, 128, 128)
TPU_CASES = {
    "causal-gqa4": (1, 150, 150, 4, 1, 128, dict(causal=True)),
    "full-t<s": (1, 100, 200, 2, 2, 64, dict(causal=False)),
    "window-softcap": (
        1,
        260,
        260,
        2,
        1,
        128,
        dict(causal=True, sliding_window=100, logit_soft_cap=3.0),
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[pytest.mark.slow] if c == "full-t<s" else []) for c in TPU_CASES],
    ids=str,
)
def test_tpu_kernel_matches_reference(case):
    b, t, s, h, kv, c, opts = TPU_CASES[case]
    q, k, v, do = util.inputs(7, b, t, s, h, kv, c, F32)
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_mosaic_tpu", interpret=True,
        block_sizes=TPU_BLOCKS,
    )  # fmt: skip


def test_tpu_kernel_packed_bf16():
    b, t, h, kv, c = 1, 256, 2, 1, 128
    seg = util.packed_segments(8, b, t, docs=3)
    q, k, v, do = util.inputs(9, b, t, t, h, kv, c, BF16)
    util.check_flash(
        q, k, v, do, dict(causal=True, segment_ids=seg), implementation="pallas_mosaic_tpu",
        interpret=True, block_sizes=TPU_BLOCKS,
    )  # fmt: skip


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(1, 90),
    s=st.integers(1, 90),
    group=st.sampled_from([(4, 4), (4, 1), (8, 2), (8, 1)]),
    c=st.sampled_from([64, 128]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 40)),
    cap=st.one_of(st.none(), st.floats(0.5, 50.0)),
    docs=st.integers(0, 4),
    dtype=st.sampled_from([F32, BF16]),
    blocks=st.sampled_from([SMALL, kernels.BlockSizes(16, 32, 32, 16), None]),
)
def test_sweep(t, s, group, c, causal, window, cap, docs, dtype, blocks):
    h, kv = group
    if docs:
        s = t
    q, k, v, do = util.inputs(t * 131 + s, 1, t, s, h, kv, c, dtype)
    opts = dict(causal=causal, sliding_window=window, logit_soft_cap=cap)
    if docs:
        opts["segment_ids"] = (
            util.packed_segments(t, 1, t, docs) if t > 1 else jnp.zeros((1, 1), jnp.int32)
        )
    util.check_flash(
        q, k, v, do, opts, implementation="pallas_triton", interpret=True, block_sizes=blocks
    )
