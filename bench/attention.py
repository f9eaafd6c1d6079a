"""Attention benchmark: Pallas flash vs cuDNN and XLA (``jax.nn.dot_product_attention``).

Prints a markdown table: ms, TFLOP/s, % of the measured bf16 matmul peak, and XLA's compiled peak
memory, for the forward and forward+backward passes. Causal attention counts half the FLOPs; the
backward counts 2.5x the forward (five matmuls against two). Every configuration also checks the
implementations against each other on the same inputs (max relative error vs the first one run).

    python bench/attention.py --seq 1024,4096 --head-dims 128 --causal 1 --mode fwd,fwdbwd
    python bench/attention.py --model            # 32 query / 8 kv heads, head dim 128
    python bench/attention.py --segments         # packed documents vs cuDNN with an explicit mask
    python bench/attention.py --tune 128         # sweep Triton block sizes for one head dim
    python bench/attention.py --tune-mosaic 128  # sweep the Mosaic GPU key block and stages
    python bench/attention.py --tune-mosaic-bwd 64,128  # the same for the Mosaic GPU backward
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmjax import kernels  # noqa: E402
from llmjax.kernels.flash import default_block_sizes  # noqa: E402


def timeit(fn, *args, reps=5, min_time=0.2):
    """Median seconds per call; each rep runs enough calls to last ``min_time``."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    n = max(1, int(min_time / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def matmul_peak(n=8192):
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / timeit(f, a, b) / 1e12


def peak_bytes(jitted, *args):
    m = jitted.lower(*args).compile().memory_analysis()
    if m is None:
        return float("nan")
    return m.temp_size_in_bytes + m.output_size_in_bytes + m.argument_size_in_bytes


# Benchmark names of llmjax's implementations; "pallas" is what implementation=None picks.
PALLAS = {"pallas": None, "triton": "pallas_triton", "mosaic": "pallas_mosaic_gpu"}


def attention_fn(impl, causal, segments, blocks, window=None):
    """A function (q, k, v, seg) -> out for one implementation."""
    if impl in PALLAS:

        def f(q, k, v, seg):
            return kernels.flash_attention(
                q, k, v, causal=causal, segment_ids=seg, sliding_window=window,
                implementation=PALLAS[impl], block_sizes=blocks,
            )  # fmt: skip

        return f

    def f(q, k, v, seg):
        mask = None
        if seg is not None:  # what a packed batch costs without segment support: a dense mask
            mask = (seg[:, :, None] == seg[:, None, :])[:, None]
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, implementation=impl,
            local_window_size=None if window is None else (window - 1, 0),
        )  # fmt: skip

    return f


def flops(b, t, s, h, c, causal, mode):
    f = 4.0 * b * h * t * s * c * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwdbwd" else 1.0)


def make_inputs(b, t, h, kv, c, seed=0, docs=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, c), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kv, c), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kv, c), jnp.bfloat16)
    seg = None
    if docs:  # documents of random lengths packed into each row
        rng = np.random.default_rng(seed)
        cuts = np.sort(rng.choice(np.arange(1, t), size=(b, docs - 1), replace=True), axis=1)
        seg = jnp.asarray((np.arange(t)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)
    return q, k, v, seg


def run_config(args, b, t, h, kv, c, causal, peak, docs=0, blocks=None, window=None):
    q, k, v, seg = make_inputs(b, t, h, kv, c, docs=docs)
    rows, ref_out = [], None
    for impl in args.impls:
        if impl == "xla" and b * h * t * t * 4 > args.xla_max_bytes:
            continue
        fwd = attention_fn(impl, causal, docs > 0, blocks, window)

        def loss(q, k, v, seg, fwd=fwd):
            return jnp.sum(fwd(q, k, v, seg).astype(jnp.float32) * v[..., :1, :].mean())

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        fwd_j = jax.jit(fwd)
        try:
            out = jax.block_until_ready(fwd_j(q, k, v, seg))
        except Exception as e:  # an implementation that cannot run this shape
            print(f"# {impl} b={b} t={t} c={c}: {type(e).__name__}: {str(e)[:160]}")
            continue
        out = np.asarray(out, np.float32)
        if ref_out is None:
            ref_out, err = out, 0.0
        else:
            err = float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out))
        for mode in args.modes:
            fn = fwd_j if mode == "fwd" else grad
            try:
                sec = timeit(fn, q, k, v, seg)
                mem = peak_bytes(fn, q, k, v, seg) / 2**30
            except Exception as e:
                print(f"# {impl} {mode} b={b} t={t} c={c}: {type(e).__name__}: {str(e)[:160]}")
                continue
            tf = flops(b, t, t, h, c, causal, mode) / sec / 1e12
            rows.append((impl, mode, sec * 1e3, tf, 100 * tf / peak, mem, err))
    for impl, mode, ms, tf, pct, mem, err in rows:
        label = f"{b}x{t} h{h}/{kv} d{c} {'causal' if causal else 'full'}"
        label += f" docs{docs}" if docs else ""
        label += f" w{window}" if window else ""
        cells = f"{ms:.3f} | {tf:.1f} | {pct:.1f}% | {mem:.2f} | {err:.1e}"
        print(f"| {label} | {impl} | {mode} | {cells} |", flush=True)
    return rows


HEADER = (
    "| shape (BxT heads q/kv, head dim) | impl | pass | ms | TFLOP/s | % bf16 peak | "
    "peak mem GiB | rel err vs first |\n|---|---|---|---|---|---|---|---|"
)


def tune(args, c, peak):
    """Sweep a few block shapes for one head dim at T = 4096 causal; print each."""
    cands_fwd = [
        (128, 64, 4, 2),
        (128, 64, 4, 3),
        (128, 128, 8, 2),
        (64, 64, 4, 2),
        (128, 32, 4, 2),
    ]
    cands_bwd = [(64, 64, 4, 2), (64, 64, 4, 1), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 1)]
    if c == 256:
        cands_fwd = [
            (64, 32, 4, 2),
            (64, 64, 4, 1),
            (128, 32, 8, 2),
            (64, 32, 8, 2),
            (32, 32, 4, 2),
        ]
        cands_bwd = [(32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 1), (32, 64, 8, 1), (64, 64, 8, 1)]
    t, h = 4096, 2048 // c
    b = max(1, args.tokens // t)
    base = default_block_sizes("pallas_triton", c)
    args = dataclasses.replace(args, impls=["triton"])
    for bq, bk, w, st in cands_fwd:
        blocks = dataclasses.replace(base, block_q=bq, block_k=bk, num_warps=w, num_stages=st)
        print(f"# tune fwd d{c} bq={bq} bk={bk} warps={w} stages={st}")
        run_config(
            dataclasses.replace(args, modes=["fwd"]), b, t, h, h, c, True, peak, blocks=blocks
        )
    for bq, bk, w, st in cands_bwd:
        blocks = dataclasses.replace(
            base, block_q_bwd=bq, block_k_bwd=bk, num_warps_bwd=w, num_stages_bwd=st
        )
        print(f"# tune bwd d{c} bq={bq} bk={bk} warps={w} stages={st}")
        run_config(
            dataclasses.replace(args, modes=["fwdbwd"]), b, t, h, h, c, True, peak, blocks=blocks
        )


@dataclasses.dataclass
class Args:
    seqs: list
    head_dims: list
    causals: list
    modes: list
    impls: list
    tokens: int
    xla_max_bytes: float


def tune_mosaic(c, peak):
    """Sweep the Mosaic GPU forward's key block and pipeline depth at T = 16384, causal and not."""
    from llmjax.kernels import common, flash_mgpu

    t, h = 16384, 2048 // c
    q, k, v, _ = make_inputs(1, t, h, h, c)
    for causal, bk, stages in itertools.product((True, False), (64, 128, 256), (2, 3)):
        spec = common.MaskSpec(causal, None, 0, t, False, None, c**-0.5)
        f = jax.jit(functools.partial(flash_mgpu.forward, spec=spec, bk=bk, stages=stages))
        try:
            tf = flops(1, t, t, h, c, causal, "fwd") / timeit(f, q, k, v) / 1e12
            print(f"# mosaic d{c} causal={causal} bk={bk} stages={stages}: {tf:.1f} TFLOP/s")
        except Exception as e:  # shared memory exhausted, register spills refused, ...
            print(f"# mosaic d{c} causal={causal} bk={bk} stages={stages}: {type(e).__name__}")


def tune_mosaic_backward(c, peak):
    """Sweep the Mosaic GPU backward's blocks (dQ key block, dK/dV query block) and stages at
    T = 16384, causal and not; TFLOP/s count the backward's 5 of fwd+bwd's 7 matmuls."""
    from llmjax.kernels import common, flash_mgpu, flash_mgpu_bwd

    t, h = 16384, 2048 // c
    q, k, v, _ = make_inputs(1, t, h, h, c)
    do = jnp.ones_like(q)
    for causal in (True, False):
        spec = common.MaskSpec(causal, None, 0, t, False, None, c**-0.5)
        out, lse = jax.jit(functools.partial(flash_mgpu.forward, spec=spec))(q, k, v)
        lse2 = lse * flash_mgpu.LOG2E
        delta = jnp.einsum("bthc,bthc->bht", out.astype(jnp.float32), do.astype(jnp.float32))
        for bk, bq, stages in itertools.product((64, 128), (64, 128), (2, 3)):
            name = f"# mosaic bwd d{c} causal={causal} bk={bk} bq={bq} stages={stages}"
            f = jax.jit(
                functools.partial(flash_mgpu_bwd.backward, spec=spec, bk=bk, bq=bq, stages=stages)
            )
            try:
                secs = timeit(f, q, k, v, do, lse2, delta)
                tf = flops(1, t, t, h, c, causal, "fwd") * 2.5 / secs / 1e12
                print(f"{name}: {tf:.1f} TFLOP/s ({100 * tf / peak:.0f}% of peak)")
            except Exception as e:  # shared memory exhausted, register spills refused, ...
                print(f"{name}: {type(e).__name__}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq", default="512,1024,2048,4096,8192,16384,32768")
    p.add_argument("--head-dims", default="64,128,256")
    p.add_argument("--causal", default="1,0", help="1 causal, 0 full; comma list")
    p.add_argument("--mode", default="fwd,fwdbwd")
    p.add_argument("--impls", default="mosaic,triton,cudnn,xla", help="also: pallas (auto)")
    p.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seq (>= 1)")
    p.add_argument("--xla-max-gib", type=float, default=8.0, help="skip XLA when logits exceed")
    p.add_argument("--model", action="store_true", help="32 query / 8 kv heads, head dim 128")
    p.add_argument("--segments", action="store_true", help="packed documents vs explicit mask")
    p.add_argument("--sweep", action="store_true", help="run the seq x head-dim x causal sweep")
    p.add_argument("--tune", default="", help="comma list of head dims to tune block sizes for")
    p.add_argument("--tune-mosaic", default="", help="head dims to tune the Mosaic GPU forward for")
    p.add_argument("--tune-mosaic-bwd", default="", help="head dims (64,128) for its backward")
    ns = p.parse_args(argv)
    args = Args(
        seqs=[int(x) for x in ns.seq.split(",")],
        head_dims=[int(x) for x in ns.head_dims.split(",")],
        causals=[x == "1" for x in ns.causal.split(",")],
        modes=ns.mode.split(","),
        impls=ns.impls.split(","),
        tokens=ns.tokens,
        xla_max_bytes=ns.xla_max_gib * 2**30,
    )
    dev = jax.devices()[0]
    peak = matmul_peak()
    print(f"# device {dev.device_kind}, jax {jax.__version__}, bf16 matmul peak {peak:.0f} TFLOP/s")
    for c in [int(x) for x in ns.tune.split(",") if x]:
        print(HEADER)
        tune(args, c, peak)
    for c in [int(x) for x in ns.tune_mosaic.split(",") if x]:
        tune_mosaic(c, peak)
    for c in [int(x) for x in ns.tune_mosaic_bwd.split(",") if x]:
        tune_mosaic_backward(c, peak)
    tuning = ns.tune or ns.tune_mosaic or ns.tune_mosaic_bwd
    if ns.sweep or not (ns.model or ns.segments or tuning):
        print(HEADER)
        for c, t, causal in itertools.product(args.head_dims, args.seqs, args.causals):
            run_config(args, max(1, args.tokens // t), t, 2048 // c, 2048 // c, c, causal, peak)
    if ns.model:
        print(HEADER)
        for t, causal in itertools.product(args.seqs, args.causals):
            run_config(args, max(1, args.tokens // t), t, 32, 8, 128, causal, peak)
    if ns.segments:
        print(HEADER)
        for t in args.seqs:
            run_config(args, max(1, args.tokens // t), t, 32, 8, 128, True, peak, docs=8)


if __name__ == "__main__":
    main()
