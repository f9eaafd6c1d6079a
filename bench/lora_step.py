"""LoRA and QLoRA against full fine-tuning: one gradient step's time and memory, side by side.

"LoRA" is llmjax's forward (``x . W + s (x . a) . b`` inside each layer); "merged form" the
alternative that forms ``W + s a . b`` before the forward, measured in the same process.

Memory is XLA's ``memory_analysis`` of the compiled ``value_and_grad`` (the frozen base, the
transient buffers, the gradients it returns); time the median of ``--steps`` calls after warm-up.

    python bench/lora_step.py --d-model 512 --layers 4 --mlp 1536 --vocab 512 --batch-size 4 \\
        --seq-len 128 --rank 8

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.inference.quantize import quantize  # noqa: E402
from llmjax.lora import LoraConfig, apply_lora, count_trainable, init_lora, merge  # noqa: E402
from llmjax.losses import next_token_loss  # noqa: E402

MiB = 2**20


def measure(fn, args, steps: int) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times),
        "arguments_mib": mem.argument_size_in_bytes / MiB,
        "transient_mib": mem.temp_size_in_bytes / MiB,
        "outputs_mib": mem.output_size_in_bytes / MiB,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--mlp", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    model = llmjax.build(
        "llama3-tiny",
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=8,
        n_kv_heads=8,
        mlp_dim=args.mlp,
        vocab_size=args.vocab,
        max_seq_len=args.seq_len,
    )
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    B, T = args.batch_size, args.seq_len
    tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T + 1), 0, args.vocab)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32),
    }
    loss = next_token_loss(model)
    cfg = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    adapters = init_lora(model, cfg, jax.random.PRNGKey(2))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # b != 0: a trained adapter

    def full(p, batch):
        return jax.value_and_grad(lambda p: loss(p, {}, batch, None)[0])(p)

    def lora(a, base, batch):
        return jax.value_and_grad(lambda a: loss(apply_lora(base, a, cfg), {}, batch, None)[0])(a)

    def merged(a, base, batch):  # the alternative: W + s a.b formed before the forward
        frozen = jax.lax.stop_gradient(base)
        return jax.value_and_grad(lambda a: loss(merge(frozen, a, cfg), {}, batch, None)[0])(a)

    nf4 = quantize(model, params, "nf4", 64)
    rows = {"full fine-tuning": measure(full, (params, batch), args.steps)}
    rows["LoRA"] = measure(lora, (adapters, params, batch), args.steps)
    rows["LoRA, merged form"] = measure(merged, (adapters, params, batch), args.steps)
    rows["QLoRA (NF4 base)"] = measure(lora, (adapters, nf4, batch), args.steps)
    rows["QLoRA, merged form"] = measure(merged, (adapters, nf4, batch), args.steps)
    count = count_trainable(model, adapters)
    print(f"{model}, batch {B} x {T}, rank {args.rank}: {100 * count.fraction:.1f}% trainable")
    print(f"{'step':<22}{'time':>8}{'arguments':>12}{'transient':>12}{'outputs':>10}  (MiB)")
    for name, r in rows.items():
        print(
            f"{name:<22}{r['step_s']:>7.3f}s{r['arguments_mib']:>12.1f}"
            f"{r['transient_mib']:>12.1f}{r['outputs_mib']:>10.1f}"
        )
    result = {"device": jax.devices()[0].device_kind, "fraction": count.fraction, **rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
