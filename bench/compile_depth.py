"""Compile time and program size of the training step against depth.

For a preset (default ``llama3.1-8b``) cut to 4, 8, 16 and 32 layers: the seconds to trace and
lower the loop's train step (``llmjax.train.make_train_step``: next-token loss, AdamW, clipping)
and to compile it, and the size of the lowered StableHLO and of the optimized HLO, all from
abstract inputs (``jax.eval_shape``): nothing is allocated, so full-size shapes fit a laptop.

    python bench/compile_depth.py --layers 4 8 16 32 --seq-len 2048 --batch-size 1

Each depth is measured with the layers unrolled and scanned (``scan_layers``, see
``llmjax.models.scan``): unrolled, every quantity grows linearly with depth; scanned, the program
holds one block and stays the same size. ``temp GiB`` is XLA's temporary memory of the compiled
step (its ``memory_analysis``). The last printed line is one JSON object.
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
    temp = compiled.memory_analysis()
    return {
        "layout": "scanned" if cfg.scan_layers else "unrolled",
        "layers": cfg.n_layers,
        "params": model.num_params(),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "stablehlo_chars": len(lowered.as_text()),
        "hlo_chars": len(compiled.as_text()),
        "temp_gib": None if temp is None else round(temp.temp_size_in_bytes / 2**30, 3),
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3.1-8b")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--remat", choices=["none", "full", "dots"], default=None, help="model.remat")
    p.add_argument(
        "--layouts", nargs="+", choices=["unrolled", "scanned"], default=["unrolled", "scanned"]
    )
    args = p.parse_args(argv)
    base = llmjax.presets.get(args.preset)
    if args.remat is not None:
        base = dataclasses.replace(base, remat=args.remat)
    rows = []
    print(
        f"{'layout':>9}{'layers':>7}{'params':>16}{'lower s':>9}{'compile s':>10}"
        f"{'StableHLO':>11}{'HLO':>11}{'temp GiB':>10}"
    )
    for n in args.layers:
        for layout in args.layouts:
            cfg = dataclasses.replace(base, n_layers=n, scan_layers=layout == "scanned")
            r = measure(cfg, args.batch_size, args.seq_len)
            rows.append(r)
            print(
                f"{layout:>9}{n:>7}{r['params']:>16,}{r['lower_s']:>9.2f}{r['compile_s']:>10.2f}"
                f"{r['stablehlo_chars']:>11,}{r['hlo_chars']:>11,}{r['temp_gib'] or 0:>10.3f}",
                flush=True,
            )
    meta = {"preset": args.preset, "remat": base.remat, "device": jax.devices()[0].device_kind}
    print(json.dumps({**meta, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
