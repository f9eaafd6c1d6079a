"""Perplexity and memory of weight-only int8 / int4 quantization on a small trained model.

Trains a byte-level llama-style model (vocabulary 256: no tokenizer to train) for ``--steps``
AdamW steps on the first 90% of a text corpus, then evaluates the held-out 10% with float32
weights and with every quantization setting of ``llmjax.inference.quantize``.

    python bench/quantize_ppl.py --data ../shared/data/tinyshakespeare.txt --steps 300

Without ``--data`` (or if the file is missing) the corpus is the Python standard library's own
sources. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.inference.quantize import QuantizedModel, param_bytes, quantize  # noqa: E402


def corpus(path: str | None, limit: int = 4_000_000) -> tuple[bytes, str]:
    if path and Path(path).is_file():
        return Path(path).read_bytes()[:limit], path
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join(p.read_bytes() for p in sorted(stdlib.glob("*.py")))
    return data[:limit], f"{stdlib}/*.py"


def batches(data: np.ndarray, seq: int, batch: int, rng):
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        yield np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-seqs", type=int, default=256)
    args = p.parse_args(argv)

    raw, source = corpus(args.data)
    data = np.frombuffer(raw, np.uint8)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    model = llmjax.build(
        "llama3-tiny",
        name="bytes-llama",
        vocab_size=256,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.d_model // 64,
        n_kv_heads=args.d_model // 64,
        mlp_dim=3 * args.d_model,
        max_seq_len=args.seq_len,
        tie_embeddings=False,
    )
    params = jax.jit(model.init)(jax.random.key(0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, 30, args.steps, args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    opt = tx.init(params)

    def loss_fn(m, p, xy):
        logits = m.apply(p, xy[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, xy[:, 1:, None], axis=-1))

    @jax.jit
    def step(params, opt, xy):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(model, p, xy))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    t0 = time.perf_counter()
    it = batches(train, args.seq_len, args.batch_size, np.random.default_rng(0))
    for i in range(args.steps):
        params, opt, loss = step(params, opt, jnp.asarray(next(it)))
        if i % 50 == 0 or i == args.steps - 1:
            print(f"step {i:4d} loss {float(loss):.3f} ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0

    n = min(args.eval_seqs, (len(held) - 1) // args.seq_len)
    evals = held[: n * args.seq_len + 1]
    xy = np.stack([evals[i * args.seq_len : (i + 1) * args.seq_len + 1] for i in range(n)])
    xy = jnp.asarray(xy.astype(np.int32))

    def perplexity(m, p):
        f = jax.jit(lambda p, b: loss_fn(m, p, b))
        losses = [float(f(p, xy[i : i + 32])) * len(xy[i : i + 32]) for i in range(0, n, 32)]
        return math.exp(sum(losses) / n)

    def linear_bytes(tree):
        return param_bytes(tree) - param_bytes(
            {k: v for k, v in tree.items() if k in ("embed", "final_norm")}
        ) - sum(
            param_bytes({k: v for k, v in layer.items() if k.endswith("norm")})
            for layer in tree["layers"].values()
        )  # fmt: skip

    rows = [dict(weights="float32", perplexity=perplexity(model, params))]
    rows[0].update(total_bytes=param_bytes(params), linear_bytes=linear_bytes(params))
    qmodel = QuantizedModel(model)
    for mode, group in (("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)):
        q = quantize(model, params, mode, group or 64)
        name = mode if group is None else f"{mode} g{group}"
        rows.append(
            dict(
                weights=name,
                perplexity=perplexity(qmodel, q),
                total_bytes=param_bytes(q),
                linear_bytes=linear_bytes(q),
            )
        )

    print(
        f"\n{model}: byte-level, {args.steps} steps of batch {args.batch_size} x {args.seq_len} "
        f"on {source} ({train_s:.0f} s); held-out {n} x {args.seq_len} bytes"
    )
    print("| weights | held-out perplexity | change | linear weights (KiB) | all params (KiB) |")
    print("|---|---|---|---|---|")
    base = rows[0]["perplexity"]
    for r in rows:
        print(
            f"| {r['weights']} | {r['perplexity']:.4f} | {100 * (r['perplexity'] / base - 1):+.2f}% "
            f"| {r['linear_bytes'] / 1024:.0f} | {r['total_bytes'] / 1024:.0f} |"
        )
    print(json.dumps(dict(benchmark="quantize_ppl", args=vars(args), source=source, results=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
