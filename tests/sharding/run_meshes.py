"""Train a tiny model a few steps on each mesh given; print the per-step losses as JSON.

Run as a subprocess so it can choose its own device count:
    python -m tests.sharding.run_meshes --devices 8 --mesh data=8:dp --mesh fsdp=4,tensor=2:fsdp_tp
With LLMJAX_COORDINATOR/LLMJAX_NUM_PROCESSES/LLMJAX_PROCESS_ID set, runs as one process of several;
each process then loads only its own rows of every global batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1, help="CPU devices in this process")
    ap.add_argument("--mesh", action="append", default=[], help="MESH:RULES, e.g. fsdp=8:fsdp")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--preset", default="llama3-tiny")
    ap.add_argument("--experts", type=int, default=0, help="n_experts of a MoE preset")
    ap.add_argument("--scan", action="store_true", help="scan_layers=True (stacked blocks)")
    args = ap.parse_args()

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    import llmjax.distributed

    llmjax.distributed.initialize()

    import numpy as np
    import optax

    import llmjax
    from llmjax import sharding
    from llmjax.layers import expert_parallel
    from llmjax.losses import next_token_loss
    from llmjax.train.mesh import state_shardings
    from llmjax.train.step import init_state, make_train_step

    moe = {"n_experts": args.experts} if args.experts else {}
    model = llmjax.build(
        args.preset, d_model=64, n_heads=4, n_kv_heads=2, mlp_dim=128, scan_layers=args.scan, **moe
    )
    tx = optax.adamw(3e-3, weight_decay=0.1)
    B, T = 8, 32
    rng = np.random.default_rng(0)
    # One packed batch, seen every step: the loss must fall, so a step that skips its update
    # (or applies it to the wrong shard) shows.
    tokens = rng.integers(0, model.config.vocab_size, (B, T + 1)).astype(np.int32)
    seg = np.repeat(np.array([[1] * 20 + [2] * 12]), B, axis=0).astype(np.int32)
    pos = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(B, 0).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": pos,
        "segment_ids": seg,
        "loss_mask": np.ones((B, T), np.float32),
    }
    batches = [batch] * args.steps
    rows = llmjax.distributed.process_rows(B)

    results = {}
    for item in args.mesh:
        spec, rules = item.split(":")
        cfg = sharding.MeshConfig.parse(spec)
        n = math.prod(getattr(cfg, a) for a in sharding.MESH_AXES)
        mesh = cfg.build(jax.devices()[:n] if n > 0 else None)  # n < 0: an axis takes the rest
        state_sh = state_shardings(model, tx, mesh, rules)
        replicated = state_sh["step"]
        with sharding.activation_rules(mesh, rules):
            state = jax.jit(lambda: init_state(model, tx, 0), out_shardings=state_sh)()
            step = jax.jit(
                make_train_step(next_token_loss(model), tx),
                out_shardings=(state_sh, replicated),
                donate_argnums=0,
            )
            losses = []
            for batch in batches:
                local = {k: v[rows] for k, v in batch.items()}
                state, metrics = step(state, {}, sharding.shard_batch(local, mesh))
                losses.append(float(metrics["loss"]))
        spec_of = lambda x: str(tuple(x.sharding.spec))
        layer = state["params"]["blocks" if args.scan else "layers"][0]
        results[item] = {
            "losses": losses,
            "wq_spec": spec_of(layer["attn"]["wq"]),
            "mu_spec": spec_of(jax.tree.leaves(state["opt_state"])[1]),
        }
        if args.experts:
            results[item]["gate_spec"] = spec_of(layer["mlp"]["gate"])
            with sharding.activation_rules(mesh, rules):
                results[item]["expert_parallel"] = expert_parallel.plan((B, T)) is not None
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(results))
    os._exit(0)  # skip distributed teardown races between processes


if __name__ == "__main__":
    main()
