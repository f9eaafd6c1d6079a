"""Compile time and program size of the training step against depth.

For a preset (default ``llama3.1-8b``) cut to 4, 8, 16 and 32 layers: the seconds to trace and
lower the loop's train step (``llmjax.train.make_train_step``: next-token loss, AdamW, clipping)
and to compile it, and the size of the lowered StableHLO and of the optimized HLO, all from
abstract inputs (``jax.eval_shape``): nothing is allocated, so full-size shapes fit a laptop.

    python bench/compile_depth.py --layers 4 8 16 32 --seq-len 2048 --batch-size 1

With layers an unrolled list every quantity grows linearly with depth; this is the baseline a
scan over layers is measured against. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.losses import next_token_loss  # noqa: E402
from llmjax.train import OptimizerConfig, make_optimizer, make_train_step  # noqa: E402
from llmjax.train.step import init_state  # noqa: E402


def measure(cfg, B: int, T: int) -> dict:
    model = llmjax.build(cfg)
    tx = make_optimizer(OptimizerConfig(lr=1e-4, warmup_steps=0), 1000)
    step = jax.jit(make_train_step(next_token_loss(model), tx), donate_argnums=0)
    state = jax.eval_shape(lambda: init_state(model, tx, 0))
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {
        "tokens": ints,
        "targets": ints,
        "positions": ints,
        "segment_ids": ints,
        "loss_mask": jax.ShapeDtypeStruct((B, T), jnp.float32),
    }
    t0 = time.perf_counter()
    lowered = step.lower(state, {}, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    return {
        "layers": cfg.n_layers,
        "params": model.num_params(),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "stablehlo_chars": len(lowered.as_text()),
        "hlo_chars": len(compiled.as_text()),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3.1-8b")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args(argv)
    base = llmjax.presets.get(args.preset)
    rows = []
    print(f"{'layers':>6}{'params':>16}{'lower s':>9}{'compile s':>10}{'StableHLO':>11}{'HLO':>11}")
    for n in args.layers:
        r = measure(dataclasses.replace(base, n_layers=n), args.batch_size, args.seq_len)
        rows.append(r)
        print(
            f"{n:>6}{r['params']:>16,}{r['lower_s']:>9.2f}{r['compile_s']:>10.2f}"
            f"{r['stablehlo_chars']:>11,}{r['hlo_chars']:>11,}",
            flush=True,
        )
    print(json.dumps({"preset": args.preset, "device": jax.devices()[0].device_kind, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
