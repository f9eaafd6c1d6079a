"""Training-step benchmark: steady-state step time, tokens/s and MFU for a preset and shape.

MFU is model FLOPs (``config.flops_per_token``, forward + backward) per second over the peak
matmul FLOP/s of the same device, measured in the same run with the same dtype, so the number
means the same thing on a laptop CPU and an accelerator. The step is the training loop's own
(``llmjax.train.make_train_step``: next-token loss, AdamW, clipping, donated state).

    python bench/train_step.py --d-model 256 --layers 4 --heads 4 --mlp 1024 --seq-len 256 \\
        --batch-size 8 --vocab 32000 --dtype float32 --steps 10

``--layout unrolled`` times one block per layer instead of the model's default scan over them.

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.config import dtype_of  # noqa: E402
from llmjax.losses import next_token_loss  # noqa: E402
from llmjax.train import OptimizerConfig, make_optimizer, make_train_step  # noqa: E402
from llmjax.train.step import init_state  # noqa: E402


def peak_matmul_flops(dtype: str, reps: int = 5) -> float:
    """Best FLOP/s of a jitted square matmul: the ceiling the step is measured against.

    Large enough to saturate the device (2048 on a CPU, 8192 on an accelerator), with several
    calls per timing so dispatch latency does not count against an accelerator's peak.
    """
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    calls = 1 if n == 2048 else 20
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), dtype_of(dtype))
    b = jax.random.normal(k2, (n, n), dtype_of(dtype))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [f(a, b) for _ in range(calls)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2 * n**3 / best


def model_config(args):
    cfg = llmjax.presets.get(args.preset)
    changes = {
        "max_seq_len": max(args.seq_len, cfg.max_seq_len),
        "dtype": args.dtype,
        "remat": args.remat,
        "scan_layers": args.layout == "scanned",
    }
    if args.d_model:
        changes["d_model"] = args.d_model
    if args.layers:
        changes["n_layers"] = args.layers
    if args.heads:
        changes.update(n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads)
    if args.d_model or args.heads:
        changes["head_dim"] = changes.get("d_model", cfg.d_model) // changes.get(
            "n_heads", cfg.n_heads
        )
    if args.mlp:
        changes["mlp_dim"] = args.mlp
    if args.vocab:
        changes["vocab_size"] = args.vocab
    return cfg.replace(**changes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-tiny")
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="default: equal to --heads")
    p.add_argument("--mlp", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    p.add_argument(
        "--layout",
        choices=["scanned", "unrolled"],
        default="scanned",
        help="one lax.scan over stacked layers (the model default) or one block per layer",
    )
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    cfg = model_config(args)
    model = llmjax.build(cfg)
    tx = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0), 10_000)
    step = jax.jit(make_train_step(next_token_loss(model), tx), donate_argnums=0)
    B, T = args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),
        "loss_mask": np.ones((B, T), np.float32),
    }
    batch = jax.tree.map(jnp.asarray, batch)
    state = jax.jit(lambda: init_state(model, tx, 0))()

    t0 = time.perf_counter()
    state, m = step(state, {}, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    state, m = step(state, {}, batch)  # one more warm step: allocator and caches settle
    jax.block_until_ready(m)
    times = []
    cpu0 = time.process_time()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, {}, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    # CPU seconds per step over wall seconds per step: about the number of cores the step got.
    # On a shared machine a low value means the wall time was inflated by other processes.
    cores_used = (time.process_time() - cpu0) / sum(times)
    step_s = statistics.median(times)
    peak = peak_matmul_flops(args.dtype)
    tps = B * T / step_s
    flops = cfg.flops_per_token(T) * tps
    result = {
        "preset": args.preset,
        "params": model.num_params(),
        "d_model": cfg.d_model,
        "layers": cfg.n_layers,
        "heads": cfg.n_heads,
        "kv_heads": cfg.resolved_kv_heads,
        "mlp": cfg.resolved_mlp_dim,
        "vocab": cfg.vocab_size,
        "seq_len": T,
        "batch_size": B,
        "dtype": args.dtype,
        "remat": args.remat,
        "scan_layers": args.layout == "scanned",
        "device": jax.devices()[0].device_kind,
        "num_devices": 1,
        "compile_s": round(compile_s, 2),
        "step_time_s": round(step_s, 4),
        "step_time_min_s": round(min(times), 4),
        "cores_used": round(cores_used, 2),
        "tokens_per_sec": round(tps, 1),
        "model_tflops_per_sec": round(flops / 1e12, 4),
        "peak_matmul_tflops_per_sec": round(peak / 1e12, 4),
        "mfu": round(flops / peak, 4),
        "final_loss": round(float(m["loss"]), 4),
    }
    print(
        f"{cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads, mlp "
        f"{cfg.resolved_mlp_dim}, vocab {cfg.vocab_size}, seq {T}, batch {B}, {args.dtype}: "
        f"{step_s:.3f} s/step (median of {args.steps}), {tps:,.0f} tokens/s, MFU "
        f"{100 * flops / peak:.1f}% of a measured {peak / 1e9:.1f} GFLOP/s matmul peak"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
