"""Mixture-of-experts dispatch benchmark: the dropless grouped matmul against two alternatives.

Times one jitted ``value_and_grad`` (forward + backward, gradients with respect to the tokens and
the three expert weights) of the routed experts alone, with the routing fixed beforehand by
``llmjax.layers.moe.route`` on random router logits, for three implementations:

- ``grouped``: the layer's own dropless path, ``MoE._dropless`` (assignments sorted by expert, one
  ``jax.lax.ragged_dot`` per expert matmul), combined with the routing weights as ``MoE`` does;
- ``per-expert``: a Python loop over the experts, each running densely on all N tokens and scaled
  by its combine weight (zero for tokens not routed to it): the usual naive baseline under jit,
  which needs static shapes, at E / k times the useful FLOPs;
- ``one-hot``: GShard / Switch dispatch: a one-hot ``[N, E, M]`` dispatch tensor (M slots per
  expert, GShard's C, ``ceil(capacity_factor * N * k / E)``; slots are taken first choices first),
  ``einsum("NEM,ND->EMD")``, batched expert matmuls, and a combine ``einsum("NEM,EMD->ND")`` that
  carries the routing weights. Assignments beyond an expert's M slots are dropped.

Every size first checks the three against each other (output and all four gradients, norm-relative
error <= 1e-5): ``per-expert`` against ``grouped``, and ``one-hot`` against ``grouped`` with the
weights of the assignments it dropped set to zero, which is the function it computes.

GFLOP/s count only the useful FLOPs: the k routed gated MLPs, three matmuls of 2 * N * k * D * F
each, three times that for forward + backward. ``cpu/wall`` is CPU seconds over wall seconds of the
timed steps: pinned to one core (``taskset -c 0``), well below 1 means other processes took it.

    taskset -c 0 python bench/moe.py --sizes 1024:8:2,4096:8:2,256:64:8 --d-model 256 --mlp 512
    python bench/moe.py --quick
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmjax.config import ModelConfig  # noqa: E402
from llmjax.layers.moe import MoE, route  # noqa: E402

IMPLS = ("grouped", "per-expert", "one-hot")
TOL = 1e-5


def make_inputs(n, e, k, d, f, seed=0):
    """Tokens, expert weights ``gate, up [E, D, F]``, ``down [E, F, D]`` and a fixed routing."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    x_ND = normal(n, d)
    gate_EDF, up_EDF, down_EFD = (
        normal(e, d, f) * d**-0.5,
        normal(e, d, f) * d**-0.5,
        normal(e, f, d) * f**-0.5,
    )
    weights_NR, experts_NR, _ = jax.jit(route, static_argnums=1)(normal(n, e), k)
    return x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR


def capacity(n, e, k, capacity_factor):
    return max(1, math.ceil(capacity_factor * n * k / e))


@functools.cache
def grouped_fn(e, k, d, f):
    """The layer's dropless path on given expert weights: ``MoE._dropless``, then its combine."""
    cfg = ModelConfig(
        vocab_size=8, d_model=d, n_layers=1, n_heads=1, n_experts=e, experts_per_token=k,
        expert_mlp_dim=f, activation="silu",
    )  # fmt: skip
    # Only the layer's structure is needed: the expert weights are the step's arguments.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))

    def fn(x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR):
        # A layer merged from new Variables, since nnx refuses to mutate one from outside the jit.
        experts = {"gate": gate_EDF, "up": up_EDF, "down": down_EFD}
        layer = nnx.merge(
            graphdef,
            nnx.State({n: v.replace(experts[n]) if n in experts else v for n, v in state.items()}),
        )
        y_NRD = layer._dropless(x_ND, experts_NR)
        return jnp.einsum("NRD,NR->ND", y_NRD, weights_NR.astype(y_NRD.dtype))

    return fn


def per_expert_fn(x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR):
    E = gate_EDF.shape[0]
    combine_NE = jnp.einsum("NRE,NR->NE", jax.nn.one_hot(experts_NR, E), weights_NR)
    y_ND = jnp.zeros_like(x_ND)
    for e in range(E):
        h_NF = jax.nn.silu(x_ND @ gate_EDF[e]) * (x_ND @ up_EDF[e])
        y_ND = y_ND + combine_NE[:, e, None] * (h_NF @ down_EFD[e])
    return y_ND


def slots(experts_NR, n_experts):
    """Each assignment's slot in its expert's buffer, taken first choices first (GShard's order)."""
    N, R = experts_NR.shape
    mask_RNE = jax.nn.one_hot(experts_NR.T, n_experts, dtype=jnp.int32)
    taken_RNE = jnp.cumsum(mask_RNE.reshape(R * N, n_experts), axis=0).reshape(R, N, n_experts)
    return ((taken_RNE - 1) * mask_RNE).sum(-1).T


@functools.cache
def one_hot_fn(capacity_factor):
    def fn(x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR):
        (N, R), E = experts_NR.shape, gate_EDF.shape[0]
        M = capacity(N, E, R, capacity_factor)
        # one_hot of a slot >= M is all zeros: that is how an overflowing assignment is dropped.
        slot_NRM = jax.nn.one_hot(slots(experts_NR, E), M)
        expert_NRE = jax.nn.one_hot(experts_NR, E)
        dispatch_NEM = jnp.einsum("NRE,NRM->NEM", expert_NRE, slot_NRM)
        combine_NEM = jnp.einsum("NRE,NRM,NR->NEM", expert_NRE, slot_NRM, weights_NR)
        x_EMD = jnp.einsum("NEM,ND->EMD", dispatch_NEM, x_ND)
        h_EMF = jax.nn.silu(jnp.einsum("EMD,EDF->EMF", x_EMD, gate_EDF))
        h_EMF = h_EMF * jnp.einsum("EMD,EDF->EMF", x_EMD, up_EDF)
        y_EMD = jnp.einsum("EMF,EFD->EMD", h_EMF, down_EFD)
        return jnp.einsum("NEM,EMD->ND", combine_NEM, y_EMD)

    return fn


@functools.partial(jax.jit, static_argnums=(1, 2))
def kept(experts_NR, n_experts, capacity_factor):
    """Which assignments one-hot dispatch at ``capacity_factor`` keeps."""
    N, R = experts_NR.shape
    return slots(experts_NR, n_experts) < capacity(N, n_experts, R, capacity_factor)


def implementations(e, k, d, f, capacity_factor):
    return {
        "grouped": grouped_fn(e, k, d, f),
        "per-expert": per_expert_fn,
        "one-hot": one_hot_fn(capacity_factor),
    }


@functools.cache
def step_fn(fn):
    """Jitted ``(loss, y_ND), grads`` of a mean-square loss, grads w.r.t. x and the three weights.

    Cached, as are the implementations, so that checks and timings of one shape share a compile.
    """

    def loss(x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR):
        y_ND = fn(x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR)
        return jnp.mean(jnp.square(y_ND)), y_ND

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def rel_err(a, b):
    """Largest norm-relative difference over matching arrays of two pytrees."""
    errs = [
        float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(errs)


def time_step(step, inputs, reps):
    """Median seconds of ``reps`` calls of a step already run once, and CPU over wall seconds."""
    times, cpu0 = [], time.process_time()
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (time.process_time() - cpu0) / sum(times)


def run_size(n, e, k, d, f, capacity_factor=1.25, reps=5):
    """Check the implementations against each other, then time them; one dict per implementation."""
    inputs = make_inputs(n, e, k, d, f)
    x_ND, gate_EDF, up_EDF, down_EFD, weights_NR, experts_NR = inputs
    fns = implementations(e, k, d, f, capacity_factor)
    steps, compile_s, outs = {}, {}, {}
    for name in IMPLS:
        steps[name] = step_fn(fns[name])
        t0 = time.perf_counter()
        steps[name].lower(*inputs).compile()  # cached: the calls below reuse it
        compile_s[name] = time.perf_counter() - t0
        (_, y_ND), grads = steps[name](*inputs)
        outs[name] = (y_ND, grads)
    keep_NR = kept(experts_NR, e, capacity_factor)
    # Dropping an assignment is giving it weight zero: one-hot computes grouped's function on
    # these weights.
    ref_one_hot = outs["grouped"]
    if not bool(keep_NR.all()):
        inputs_kept = (x_ND, gate_EDF, up_EDF, down_EFD, weights_NR * keep_NR, experts_NR)
        (_, y_ND), grads = steps["grouped"](*inputs_kept)
        ref_one_hot = (y_ND, grads)
    errs = {name: rel_err(outs[name], outs["grouped"]) for name in IMPLS}
    errs["one-hot"] = rel_err(outs["one-hot"], ref_one_hot)
    for name, err in errs.items():
        assert err <= TOL, f"{name} differs from grouped at N={n} E={e} k={k}: {err:.1e}"
    useful = 18.0 * n * k * d * f
    rows = []
    for name in IMPLS:
        sec, cpu = time_step(steps[name], inputs, reps)
        rows.append(
            {
                "tokens": n, "experts": e, "k": k, "impl": name, "ms": sec * 1e3,
                "tokens_s": n / sec, "gflop_s": useful / sec / 1e9, "compile_s": compile_s[name],
                "cpu_wall": cpu, "rel_err": errs[name],
                "dropped": float(1 - keep_NR.mean()) if name == "one-hot" else 0.0,
            }
        )  # fmt: skip
    for r in rows:
        r["vs_grouped"] = r["ms"] / rows[0]["ms"]
    return rows


HEADER = (
    "| N | E | k | impl | ms / step | tokens/s | useful GFLOP/s | x grouped | compile s | "
    "cpu/wall | dropped | rel err |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(r):
    return (
        f"| {r['tokens']} | {r['experts']} | {r['k']} | {r['impl']} | {r['ms']:.1f} | "
        f"{r['tokens_s']:,.0f} | {r['gflop_s']:.1f} | {r['vs_grouped']:.2f} | "
        f"{r['compile_s']:.1f} | {r['cpu_wall']:.2f} | {100 * r['dropped']:.2f}% | "
        f"{r['rel_err']:.1e} |"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1024:8:2,4096:8:2,256:64:8", help="N:E:k, comma list")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--mlp", type=int, default=512, help="each expert's hidden width F")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="one-hot dispatch only")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    d, f, reps = args.d_model, args.mlp, args.reps
    if args.quick:
        sizes, d, f, reps = [(64, 4, 2), (64, 8, 3)], 32, 64, 2
    dev = jax.devices()[0]
    print(
        f"# {time.strftime('%Y-%m-%d')}, device {dev.device_kind}, jax {jax.__version__}, "
        f"float32, D={d} F={f}, one-hot capacity factor {args.capacity_factor}, "
        f"median of {reps}"
    )
    print(HEADER)
    rows = []
    for n, e, k in sizes:
        run = functools.partial(run_size, capacity_factor=args.capacity_factor, reps=reps)
        for r in run(n, e, k, d, f):
            print(format_row(r), flush=True)
            rows.append(r)
    return rows


if __name__ == "__main__":
    main()
