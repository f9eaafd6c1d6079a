"""Chunked cross-entropy against full logits: compiled memory and time of loss + gradient.

The loss is ``next_token_loss``'s on the output layer alone: final hidden states ``[N, D]`` and an
untied head ``[D, V]`` (llama3's V = 128256), mean cross entropy over the tokens, gradients to the
hidden states and the head. ``chunk`` 0 is the full-logits path (``model.apply``'s einsum, then
``masked_cross_entropy``); any other value ``chunked_logit_stats`` with that many tokens per step.

Two tables. Memory: XLA's compiled memory analysis of the jitted loss + gradient for abstract
inputs (``jax.ShapeDtypeStruct``; nothing is allocated, so any size compiles on a laptop): its
temporary buffers, and the peak (arguments + outputs + temporaries). Time: median seconds per
loss + gradient on random inputs of a size this machine can run, with the relative difference of
the chunked loss and gradients from the full path.

    python bench/chunked_ce.py                                   # the defaults below
    python bench/chunked_ce.py --mem-tokens 16384 --chunks 0,1024 --time-tokens 4096 --time-d 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmjax.losses import chunked_logit_stats, masked_cross_entropy  # noqa: E402


def loss_fn(chunk: int, dtype):
    """``(hidden [N, D], w [D, V], targets [N]) -> mean cross entropy``, float32 math."""

    def loss(hidden, w, targets):
        h, t = hidden[None], targets[None]
        mask = jnp.ones(t.shape, jnp.float32)
        if chunk == 0:
            logits = jnp.einsum("BTD,DV->BTV", h.astype(dtype), w.astype(dtype))
            return masked_cross_entropy(logits.astype(jnp.float32), t, mask)[0]
        stats = chunked_logit_stats(h, w, t, tied=False, dtype=dtype, chunk=chunk)
        return (stats.log_z - stats.target).mean()

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def compiled_memory(chunk, N, D, V, dtype):
    args = (
        jax.ShapeDtypeStruct((N, D), jnp.float32),
        jax.ShapeDtypeStruct((D, V), jnp.float32),
        jax.ShapeDtypeStruct((N,), jnp.int32),
    )
    m = loss_fn(chunk, dtype).lower(*args).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return m.temp_size_in_bytes, peak


def timeit(fn, *args, reps=2):
    """``(median seconds per call, the output)``; the first call (compiling) is not timed."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def ints(text):
    return [int(x) for x in text.split(",")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--mem-tokens", type=ints, default=[4096, 16384], help="tokens per device")
    ap.add_argument("--mem-d", type=int, default=4096, help="model width for the memory table")
    ap.add_argument("--time-tokens", type=int, default=2048)
    ap.add_argument("--time-d", type=int, default=256, help="model width for the time table")
    ap.add_argument("--chunks", type=ints, default=[0, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--time-chunks", type=ints, default=[0, 256, 512, 1024, 2048])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    V, GiB = args.vocab, 2**30
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}; V = {V}")
    print(f"\n### Compiled memory, D = {args.mem_d} (abstract inputs)\n")
    print("| tokens | compute | chunk | temp GiB | peak GiB | one [N, V] f32 GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for N in args.mem_tokens:
        for dtype in dtypes:
            for chunk in args.chunks:
                t0 = time.perf_counter()
                temp, peak = compiled_memory(chunk, N, args.mem_d, V, dtype)
                label = "full" if chunk == 0 else str(chunk)
                print(
                    f"| {N} | {dtype.name} | {label} | {temp / GiB:.3f} | {peak / GiB:.3f} | "
                    f"{N * V * 4 / GiB:.3f} | {time.perf_counter() - t0:.1f} |",
                    flush=True,
                )

    N, D = args.time_tokens, args.time_d
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    flops = 3 * 2 * N * D * V  # forward matmul + its two backward matmuls
    print(f"\n### Loss + gradient time, N = {N}, D = {D} (float32 compute)\n")
    print(
        "| chunk | s / step | GFLOP/s (3 matmuls) | x full | rel err loss | rel err dh | rel err dw |"
    )
    print("|---|---|---|---|---|---|---|")
    ref, base = None, None
    for chunk in args.time_chunks:
        f = loss_fn(chunk, jnp.float32)
        seconds, (value, (dh, dw)) = timeit(f, hidden, w, targets, reps=args.reps)
        if chunk == 0:
            ref, base = (value, dh, dw), seconds
        errs = (
            ["-"] * 3
            if ref is None or chunk == 0
            else [f"{rel_err(a, b):.1e}" for a, b in zip((value, dh, dw), ref, strict=True)]
        )
        ratio = f"{seconds / base:.2f}" if base else "-"
        label = "full" if chunk == 0 else str(chunk)
        print(
            f"| {label} | {seconds:.2f} | {flops / seconds / 1e9:.1f} | {ratio} | "
            + " | ".join(errs)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
