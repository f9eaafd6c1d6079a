"""Shared helpers for kernel tests: inputs, packed segment ids, dtype-derived tolerances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import kernels

# Norm-relative error bounds, from each dtype's machine epsilon. fp32: the kernel and the
# reference sum in a different order, a few hundred ulps at most over these reductions. bf16:
# the output is rounded once (eps/2 per element) and P / dS are rounded to bf16 before the
# matrix units, as cuDNN and every flash kernel do; 2 eps covers both with no margin to hide a
# wrong mask (a single misplaced key moves the error by O(1)).
TOLERANCE = {
    jnp.dtype(jnp.float32): 100 * float(jnp.finfo(jnp.float32).eps),
    jnp.dtype(jnp.bfloat16): 2 * float(jnp.finfo(jnp.bfloat16).eps),
    jnp.dtype(jnp.float16): 2 * float(jnp.finfo(jnp.float16).eps),
}


# Inputs are unit normals, so outputs and gradients have an RMS of order 0.1-1. A gradient that
# cancels to ~0 (with a single visible key, dq vanishes exactly: dS = dP - rowsum(dO * O) = 0) is
# judged against that natural scale, not against zero, where fp32 rounding of the cancelling terms
# (~1e-7) would read as an infinite relative error. A misplaced key still moves the error by O(1).
RMS_FLOOR = 0.1


def rel_err(x, ref):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    floor = RMS_FLOOR * np.sqrt(ref.size)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def assert_close(x, ref, dtype, what=""):
    err = rel_err(x, ref)
    tol = TOLERANCE[jnp.dtype(dtype)]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def inputs(seed, b, t, s, h, kv, c, dtype):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, c), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, kv, c), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, kv, c), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, c), jnp.float32).astype(dtype)
    return q, k, v, do


def packed_segments(seed, b, n, docs):
    """Ids of ``docs`` documents of random lengths packed into each of ``b`` rows of length n."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(1, n, size=(b, docs - 1)), axis=1)
    return jnp.asarray((np.arange(n)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)


def check_flash(q, k, v, do, opts, *, implementation, interpret, block_sizes=None, grads=True):
    """Kernel vs fp32 reference on the same (possibly bf16) inputs: output, lse, dq, dk, dv."""
    dtype = q.dtype

    def kernel(q, k, v):
        return kernels.flash_attention(
            q, k, v, implementation=implementation, interpret=interpret,
            block_sizes=block_sizes, return_lse=True, **opts,
        )  # fmt: skip

    def ref(q, k, v):
        return kernels.attention_reference(q, k, v, return_lse=True, **opts)

    up = [x.astype(jnp.float32) for x in (q, k, v)]
    # Each kernel call finishes before the reference runs: an interpreted GPU kernel runs its
    # warpgroups as threads that wait on each other inside XLA's CPU runtime, and a computation
    # dispatched beside them can take the last free slot and leave a waiting thread unscheduled.
    (out, lse), vjp = jax.block_until_ready(jax.vjp(kernel, q, k, v))
    (out_r, lse_r), vjp_r = jax.vjp(ref, *up)
    assert (
        out.dtype == dtype
        and out.shape == q.shape
        and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    )
    assert_close(out, out_r, dtype, "out")
    seen = np.isfinite(np.asarray(lse_r))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), seen)
    assert_close(
        np.where(seen, lse, 0),
        np.where(seen, lse_r, 0),
        jnp.float32 if dtype == jnp.float32 else dtype,
        "lse",
    )
    if not grads:
        return
    cot = (do, jnp.zeros_like(lse))
    grads = jax.block_until_ready(vjp(cot))
    for name, g, g_r in zip("qkv", grads, vjp_r((do.astype(jnp.float32), cot[1])), strict=True):
        assert g.dtype == dtype
        assert_close(g, g_r, dtype, f"d{name}")


def paged_caches(seed, k, v, lengths, page):
    """The caches ``[B, K, M*page, C]`` as shuffled pages of a pool ``[K, P, page, C]`` with two
    spare pages, plus the page table. Spare pages are NaN and table entries past a sequence's
    last page are out-of-pool ids: neither may be read."""
    b, kv, s, c = k.shape
    m = s // page
    rng = np.random.default_rng(seed)
    n_pages = b * m + 2
    table = rng.permutation(n_pages)[: b * m].reshape(b, m)

    def pool(x):
        pages = x.reshape(b, kv, m, page, c).transpose(1, 0, 2, 3, 4).reshape(kv, b * m, page, c)
        return (
            jnp.full((kv, n_pages, page, c), jnp.nan, x.dtype).at[:, table.reshape(-1)].set(pages)
        )

    used = -(-np.asarray(lengths) // page)
    garbage = np.where(np.arange(m) % 2, -3, 10**6)[None]
    table = np.where(np.arange(m)[None] < used[:, None], table, garbage)
    return pool(k), pool(v), jnp.asarray(table, jnp.int32)
