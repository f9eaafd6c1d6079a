"""Decoding benchmark: llmjax's sampler against Hugging Face ``transformers`` on the same weights.

For each model size in ``SIZES`` (llama-style, random weights) the model is exported with
``llmjax.to_hf`` and loaded by ``transformers.AutoModelForCausalLM``; both decode greedily with
their KV caches on the same CPU in the same process, and the generated tokens must be equal.
Reported per size and batch:

- time to first token (TTFT): prefill of the prompt plus the first token;
- decode tokens/s: the remaining ``new - 1`` tokens of every sequence over their wall time;
- the matmul floor: tokens/s if a step cost only its weight matmuls, timed in torch. It bounds
  what any framework can reach, so it tells overhead (which a compiled loop removes) from
  arithmetic (which it cannot);
- the bandwidth ceiling: batch x (bytes/s at which this machine streams a matrix as large as the
  model's weight matrices) / (their bytes). Every step reads every weight once, so no float32
  decoder exceeds it; at batch 1 the matmul floor sits close to it.

transformers is timed with each torch thread count in ``--torch-threads`` and the faster one is
the baseline (on a busy 2-core machine one thread can beat two: OpenMP workers spin).
For llmjax the two phases are its two jitted calls (``prefill`` and the ``while_loop`` decode),
timed after a warm-up compile. For transformers, a stopping criterion stamps the time as each
token is appended inside ``generate``: TTFT runs to the first stamp, decode from the first to
the last. Both phases are timed within the same run, never as a difference of two runs (which
noise can make negative). Each timing is the best of ``--reps`` runs: the machine may be
shared, and the fastest run is the least disturbed one.

    python bench/decode.py --reps 5                        # every size, batch 1 and 16
    python bench/decode.py --sizes 60m --batch 1 --new 64

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llmjax  # noqa: E402
from llmjax.config import RopeConfig  # noqa: E402
from llmjax.inference import sampler  # noqa: E402
from llmjax.inference.processors import SamplingConfig  # noqa: E402

# Llama-style shapes: (d_model, layers, heads, kv_heads, mlp, vocab).
SIZES = {
    # The model `llmjax pretrain` trains by default (recipes/pretrain.py).
    "stdlib": (128, 4, 4, 2, 384, 1024),
    "12m": (256, 6, 8, 4, 768, 8192),
    "60m": (512, 8, 8, 8, 1536, 32000),
}


def model_config(size, init_std, scan_layers=True):
    d, layers, heads, kv_heads, mlp, vocab = SIZES[size]
    return llmjax.build(
        "llama3-tiny",
        name=f"llama-bench-{size}",
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        mlp_dim=mlp,
        max_seq_len=2048,
        rope=RopeConfig(theta=500_000.0),
        # Larger than the usual 0.02 so that next-token logits are far from tied: greedy outputs
        # of two float32 implementations then agree token for token.
        init_std=init_std,
        scan_layers=scan_layers,
    )


def best_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_phases(run, reps):
    """``run()`` returns ``(output, ttft seconds, decode seconds)`` of one generation; the best
    of each phase over ``reps`` runs, with the last run's output."""
    runs = [run() for _ in range(reps)]
    return runs[-1][0], min(r[1] for r in runs), min(r[2] for r in runs)


def bench_llmjax(model, params, prompts, new, reps):
    cfg = SamplingConfig()
    tokens, lengths = sampler.pad_prompts(prompts, model.config.vocab_size)
    args = (jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0))
    extra = (cfg.params(model.config.vocab_size), sampler.stop_array(()))
    kw = dict(mode=cfg.mode, max_new=new, masked=False)

    def run():
        t0 = time.perf_counter()
        # As generate does: a scanned model's stacks are sliced once per call (counted in TTFT).
        m, p = sampler.for_decoding(model, params)
        state = jax.block_until_ready(sampler.prefill(m, p, *args, *extra, **kw))
        t1 = time.perf_counter()
        out = jax.block_until_ready(sampler.decode_loop(m, p, state, mode=cfg.mode))
        return np.asarray(out.out_BN), t1 - t0, time.perf_counter() - t1

    run()  # compiles both calls
    return best_phases(run, reps)


def bench_hf(hf_model, prompts, new, reps):
    import torch
    import transformers

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)

    class Stamps(transformers.StoppingCriteria):
        """Never stops; records when each new token has been appended."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def run():
        stamps = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                stopping_criteria=transformers.StoppingCriteriaList([stamps]),
            )
        assert len(stamps.times) == new, (len(stamps.times), new)
        first, last = stamps.times[0], stamps.times[-1]
        return out[:, ids.shape[1] :].numpy(), first - t0, last - first

    run()  # warm-up
    return best_phases(run, reps)


def matmul_floor(hf_model, batch, reps):
    """Seconds for one decode step's weight matmuls alone: every ``nn.Linear`` of the model
    (lm_head included) applied to ``batch`` rows, back to back in torch. No framework can decode
    a step faster than its BLAS multiplies the weights, so this bounds any speedup."""
    import torch

    linears = [m for m in hf_model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, m.in_features) for m in linears]

    def step():
        with torch.inference_mode():
            for m, x in zip(linears, xs, strict=True):
                torch.nn.functional.linear(x, m.weight)

    step()
    return best_time(step, reps * 10)


def stream_rate(nbytes, torch_threads, reps):
    """Bytes/s at which this machine reads an ``nbytes`` float32 matrix in a matrix-vector
    product (XLA in a compiled loop, and torch with each thread count; the fastest). Decoding
    one token reads every weight matrix once, so ``rate / weight bytes`` bounds tokens/s at
    batch 1 for any framework that keeps float32 weights."""
    import torch

    cols = 1024
    w = np.random.default_rng(0).standard_normal((max(1, nbytes // 4 // cols), cols), np.float32)
    x = np.ones(cols, np.float32)
    n = 10
    loop = jax.jit(
        lambda w, x: jax.lax.fori_loop(0, n, lambda i, a: a + w @ (x + i), jnp.zeros(w.shape[0]))
    )
    wj, xj = jnp.asarray(w), jnp.asarray(x)
    jax.block_until_ready(loop(wj, xj))
    best = best_time(lambda: jax.block_until_ready(loop(wj, xj)), reps) / n
    wt, xt = torch.from_numpy(w), torch.from_numpy(x)
    with torch.inference_mode():
        for threads in torch_threads:
            torch.set_num_threads(threads)
            best = min(best, best_time(lambda: torch.mv(wt, xt), reps * n))
    return w.nbytes / best


def bench_size(size, args):
    import torch
    import transformers

    model = model_config(size, args.init_std, args.layout == "scanned")
    params = jax.jit(model.init)(jax.random.key(0))
    with tempfile.TemporaryDirectory() as d:
        llmjax.to_hf(model, params, d)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf_model.eval()
    hf_model.generation_config.eos_token_id = None
    vocab = model.config.vocab_size
    print(f"{size}: {model}, {SIZES[size]} (d_model, layers, heads, kv_heads, mlp, vocab)")

    weight_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in hf_model.modules()
        if isinstance(m, torch.nn.Linear)
    )
    rate = stream_rate(weight_bytes, [int(t) for t in args.torch_threads.split(",")], args.reps)
    rows = []
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in args.batch.split(",")]:
        prompts = rng.integers(1, vocab, (batch, args.prompt_len)).tolist()
        ours, j_ttft, j_dec = bench_llmjax(model, params, prompts, args.new, args.reps)
        hf, floor = {}, {}
        for threads in [int(t) for t in args.torch_threads.split(",")]:
            torch.set_num_threads(threads)
            hf[threads] = bench_hf(hf_model, prompts, args.new, args.reps)
            floor[threads] = matmul_floor(hf_model, batch, args.reps)
        threads = min(hf, key=lambda t: hf[t][2])
        theirs, h_ttft, h_dec = hf[threads]
        equal = all(bool((ours == h[0]).all()) for h in hf.values())
        first_diff = None if equal else int(np.argwhere(ours != theirs)[:, 1].min())
        tokens = batch * (args.new - 1)
        rows.append(
            dict(
                size=size,
                params=model.num_params(),
                batch=batch,
                llmjax_ttft_ms=1e3 * j_ttft,
                hf_ttft_ms=1e3 * h_ttft,
                llmjax_decode_tok_s=tokens / j_dec,
                hf_decode_tok_s=tokens / h_dec,
                hf_threads=threads,
                hf_decode_tok_s_by_threads={t: tokens / h[2] for t, h in hf.items()},
                matmul_floor_tok_s=batch / min(floor.values()),
                weight_bytes=weight_bytes,
                stream_gb_s=rate / 1e9,
                bandwidth_ceiling_tok_s=batch * rate / weight_bytes,
                speedup=h_dec / j_dec,
                greedy_equal=equal,
                first_difference=first_diff,
            )
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"model sizes among {list(SIZES)}")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--init-std", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--layout",
        choices=["scanned", "unrolled"],
        default="scanned",
        help="llmjax's layer layout (the samplers slice a scanned model's stacks once per call)",
    )
    p.add_argument(
        "--torch-threads",
        default="1,2",
        help="torch intra-op thread counts to try; the fastest is the baseline",
    )
    args = p.parse_args(argv)
    sizes = args.sizes.split(",")
    if unknown := [s for s in sizes if s not in SIZES]:
        p.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")

    import torch
    import transformers

    print(
        f"prompt {args.prompt_len}, {args.new} new tokens, greedy, float32, {args.layout} layers; "
        f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"(threads {args.torch_threads}), transformers {transformers.__version__}"
    )
    rows = [r for size in sizes for r in bench_size(size, args)]

    print()
    print("| model | batch | TTFT llmjax (ms) | TTFT transformers (ms) | decode llmjax (tok/s) "
          "| decode transformers (tok/s, threads) | speedup | matmul floor (tok/s) "
          "| bandwidth ceiling (tok/s) | greedy equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} ({r['params'] / 1e6:.1f} M) | {r['batch']} | "
            f"{r['llmjax_ttft_ms']:.1f} | {r['hf_ttft_ms']:.1f} | "
            f"{r['llmjax_decode_tok_s']:.0f} | {r['hf_decode_tok_s']:.0f} ({r['hf_threads']}) | "
            f"{r['speedup']:.2f}x | {r['matmul_floor_tok_s']:.0f} | "
            f"{r['bandwidth_ceiling_tok_s']:.0f} | {r['greedy_equal']} |"
        )
    print(json.dumps(dict(benchmark="decode", args=vars(args), results=rows)))
    return 0 if all(r["greedy_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
