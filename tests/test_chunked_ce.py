"""Chunked cross-entropy (``llmjax.losses.chunked``) against the full logits: per-token statistics,
losses, metrics and gradients (hidden states, head, every model parameter), tied and untied heads,
soft-cap, temperature, masks with -100 targets, bfloat16, LoRA and quantized heads, mixture of
experts, the compiled memory it saves, and (as a subprocess with 8 devices) sharded meshes.

``python -m tests.test_chunked_ce --devices 8`` runs the sharded comparison on its own.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import ConfigError, InputError
from llmjax.losses import (
    chunked_logit_stats,
    cross_entropy_of_stats,
    masked_cross_entropy,
    next_token_loss,
    plain_logit_stats,
    sequence_logprobs,
    target_logprobs,
)

TOL = 1e-5  # float32, relative to the largest entry of the reference


def _close(actual, expected, tol=TOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), 1e-30)
    err = np.abs(actual - expected).max() / scale
    assert err <= tol, f"max error {err:.2e} of the largest entry {scale:.2e} > {tol:.0e}"


def _trees_close(actual, expected, tol=TOL):
    leaves = jax.tree.leaves_with_path(expected)
    for (path, e), a in zip(leaves, jax.tree.leaves(actual), strict=True):
        try:
            _close(a, e, tol)
        except AssertionError as err:
            raise AssertionError(f"{jax.tree_util.keystr(path)}: {err}") from None


# --- the pure function, on hidden states and a head ---------------------------------------------


def _head_problem(tied, *, B=3, T=37, D=16, V=300, scale=3.0, seed=0):
    """Hidden states, a head, a float mask with -100 targets where it is 0 and, where it is set,
    targets that are the arg-max for about a third of the tokens (so accuracy is not 0)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    w = (scale * rng.normal(size=(V, D) if tied else (D, V)) / np.sqrt(D)).astype(np.float32)
    logits = np.einsum("BTD,VD->BTV" if tied else "BTD,DV->BTV", hidden, w)
    targets = rng.integers(0, V, (B, T))
    argmax = rng.random((B, T)) < 0.35
    targets = np.where(argmax, logits.argmax(-1), targets)
    mask = (rng.random((B, T)) > 0.25) * rng.choice([1.0, 0.5], (B, T))
    targets = np.where(mask > 0, targets, -100).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(targets), jnp.asarray(mask, jnp.float32)


def _full_logits(hidden, w, tied, dtype=jnp.float32, softcap=None):
    """The logits exactly as ``model.apply`` forms them from the final hidden states."""
    eq = "BTD,VD->BTV" if tied else "BTD,DV->BTV"
    logits = jnp.einsum(eq, hidden.astype(dtype), w.astype(dtype)).astype(jnp.float32)
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def _losses(tied, softcap, temperature, chunk, z_loss=1e-2, dtype=jnp.float32):
    """Jitted ``(loss, metrics, grads)`` of the chunked and the full path on one problem."""

    def chunked(hidden, w, targets, mask):
        stats = chunked_logit_stats(
            hidden,
            w,
            targets,
            mask,
            tied=tied,
            dtype=dtype,
            softcap=softcap,
            temperature=temperature,
            chunk=chunk,
        )
        return cross_entropy_of_stats(stats, mask, z_loss, accuracy=True)

    def full(hidden, w, targets, mask):
        logits = _full_logits(hidden, w, tied, dtype, softcap) / temperature
        return masked_cross_entropy(logits, targets, mask, z_loss, accuracy=True)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    return grad(chunked), grad(full)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7], ids=["t1", "t0.7"])
def test_loss_metrics_and_grads_match_full_logits(tied, softcap, temperature):
    """z-loss, accuracy, weighted mask with -100 targets, 111 tokens in chunks of 16 (7 chunks,
    the last padded); the soft-cap of 2 bends logits of scale 3, so its chain term matters."""
    args = _head_problem(tied)
    chunked, full = _losses(tied, softcap, temperature, chunk=16)
    (loss, aux), grads = chunked(*args)
    (ref_loss, ref_aux), ref_grads = full(*args)
    _close(loss, ref_loss)
    assert set(aux) == set(ref_aux) == {"nll", "tokens", "z_loss", "mean_token_accuracy"}
    for k in ref_aux:
        _close(aux[k], ref_aux[k])
    assert 0.2 < float(aux["mean_token_accuracy"]) < 1  # the metric is exercised
    _trees_close(grads, ref_grads)  # hidden states and head
    assert np.abs(np.asarray(grads[0])).max() > 0 and np.abs(np.asarray(grads[1])).max() > 0


@pytest.mark.parametrize("chunk", [1, 7, 111, 4096])
def test_any_chunk_gives_the_same_statistics(chunk):
    """One token per step, a chunk that does not divide the 111 tokens, exactly one chunk, and a
    chunk larger than the batch: per-token target logit, log Z and hit, against the full logits."""
    hidden, w, targets, mask = _head_problem(False)
    stats = jax.jit(lambda h, w, t, m: chunked_logit_stats(h, w, t, m, tied=False, chunk=chunk))(
        hidden, w, targets, mask
    )
    ref = plain_logit_stats(_full_logits(hidden, w, False), targets, mask)
    keep = np.asarray(mask) > 0
    for name in ("target", "log_z"):
        _close(np.asarray(getattr(stats, name))[keep], np.asarray(getattr(ref, name))[keep])
    np.testing.assert_array_equal(np.asarray(stats.hit)[keep], np.asarray(ref.hit)[keep])
    _close(
        (jnp.where(mask > 0, stats.logp, 0) * mask).sum(-1),
        sequence_logprobs(_full_logits(hidden, w, False), targets, mask),
    )


def test_masked_rows_may_hold_nan_and_minus_100():
    """Rows the mask leaves out (NaN hidden states, -100 targets) give finite values, no NaN in
    any gradient, a zero gradient for those rows, and the loss of the clean problem."""
    hidden, w, targets, mask = _head_problem(False)
    poisoned = jnp.where(mask[..., None] > 0, hidden, jnp.nan)
    clean = jnp.where(mask[..., None] > 0, hidden, 0.0)
    chunked, full = _losses(False, None, 1.0, chunk=16)
    (loss, _), (g_hidden, g_w) = chunked(poisoned, w, targets, mask)
    (ref, _), (ref_hidden, ref_w) = full(clean, w, targets, mask)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(g_hidden)) and np.all(np.isfinite(g_w))
    assert np.all(np.asarray(g_hidden)[np.asarray(mask) == 0] == 0)
    _close(loss, ref)
    _close(g_hidden, ref_hidden)
    _close(g_w, ref_w)
    # The full path's own convention: -100 targets under a zero mask give a finite loss.
    assert np.isfinite(float(full(hidden, w, targets, mask)[0][0]))


# bfloat16: both paths round the matmul's output to bfloat16 before the float32 softmax and feed
# bfloat16 cotangents to the two backward matmuls, so the loss agrees to float32 precision (the
# 1e-5 of float32). They differ where a bfloat16 matmul output is rounded: the head's gradient is
# one matmul over all tokens in the full path, a float32 sum of per-chunk products rounded once in
# the chunked path, so an entry may land one bfloat16 step (2^-8 relative) apart; the tolerance is
# that step, relative to the largest entry. Measured here: loss equal, head gradient 1.9e-5 (tied)
# and 3.6e-5 (untied) apart, hidden-state gradient 8.7e-7; through a bfloat16 llama3-tiny layer,
# loss 1.4e-7 and every parameter's gradient equal.
BF16_TOL = 2.0**-8


def test_bfloat16_matches_the_bfloat16_full_path():
    hidden, w, targets, mask = _head_problem(True, D=64, V=1000)
    chunked, full = _losses(True, 2.0, 1.0, chunk=16, dtype=jnp.bfloat16)
    (loss, aux), (g_hidden, g_w) = chunked(hidden, w, targets, mask)
    (ref, ref_aux), (ref_hidden, ref_w) = full(hidden, w, targets, mask)
    _close(loss, ref)
    _close(aux["mean_token_accuracy"], ref_aux["mean_token_accuracy"])
    _close(g_hidden, ref_hidden, BF16_TOL)
    _close(g_w, ref_w, BF16_TOL)
    # Per token, the logits are the full path's bfloat16 ones, not float32 ones (which differ
    # here by up to 3e-2): the rounding is kept.
    keep = np.asarray(mask) > 0

    def stats(dtype):
        logits = _full_logits(hidden, w, True, dtype, 2.0)
        return plain_logit_stats(logits, targets, mask)

    got = chunked_logit_stats(
        hidden, w, targets, mask, tied=True, dtype=jnp.bfloat16, softcap=2.0, chunk=16
    )
    bf16, f32 = stats(jnp.bfloat16), stats(jnp.float32)
    for name in ("target", "log_z"):
        _close(np.asarray(getattr(got, name))[keep], np.asarray(getattr(bf16, name))[keep])
    assert np.abs(np.asarray(got.target - f32.target))[keep].max() > 1e-2


def test_bad_arguments_name_the_fix():
    hidden, w, targets, mask = _head_problem(False)
    with pytest.raises(InputError, match="tied=True"):
        chunked_logit_stats(hidden, w, targets, tied=True)
    with pytest.raises(InputError, match=r"one target per token"):
        chunked_logit_stats(hidden, w, targets[:, 1:], tied=False)
    with pytest.raises(InputError, match="positive int"):
        chunked_logit_stats(hidden, w, targets, tied=False, chunk=0)
    model = llmjax.build("llama3-tiny")
    with pytest.raises(ConfigError, match="0 or None for the full logits"):
        next_token_loss(model, chunk=-1)
    from llmjax.train import LoopConfig

    with pytest.raises(ConfigError, match="loop.ce_chunk"):
        LoopConfig(ce_chunk=-1)


# --- through a model ----------------------------------------------------------------------------


def _batch(model, B=2, T=24, seed=0):
    V = model.config.vocab_size
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    seg = np.repeat(np.array([[1] * 15 + [2] * (T - 15)]), B, axis=0).astype(np.int32)
    pos = np.concatenate([np.arange(15), np.arange(T - 15)])[None].repeat(B, 0).astype(np.int32)
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(np.where(mask > 0, tokens[:, 1:], -100)),
        "positions": jnp.asarray(pos),
        "segment_ids": jnp.asarray(seg),
        "loss_mask": jnp.asarray(mask),
    }


def _value_and_grad(model, chunk, z_loss=1e-2):
    loss = next_token_loss(model, z_loss, accuracy=True, chunk=chunk)
    return jax.value_and_grad(lambda p, b: loss(p, {}, b, None), has_aux=True)


def _compare_steps(model, params, batch, tol=TOL, grad_tol=TOL):
    """Chunks of 8 against the full logits, both in one jitted function (one compilation)."""
    both = jax.jit(lambda p, b: (_value_and_grad(model, 8)(p, b), _value_and_grad(model, 0)(p, b)))
    ((loss, aux), grads), ((ref, ref_aux), ref_grads) = both(params, batch)
    _close(loss, ref, tol)
    assert set(aux) == set(ref_aux)
    for k in ref_aux:
        _close(aux[k], ref_aux[k], tol)
    _trees_close(grads, ref_grads, grad_tol)
    return aux


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("llama3-tiny", {}),  # untied lm_head
        ("gemma2-tiny", {"final_logit_softcap": 0.1}),  # tied, soft-cap that bends the logits
    ],
    ids=["untied", "tied-softcap"],
)
def test_next_token_loss_matches_full_logits_through_the_model(preset, overrides):
    """Loss, nll, z-loss, accuracy and the gradient of every parameter; 48 tokens in chunks of 8,
    -100 targets under the mask, two packed documents per row."""
    model = llmjax.build(preset, n_layers=1, **overrides)
    params = model.init(jax.random.key(0))
    _compare_steps(model, params, _batch(model))


def test_bfloat16_model_matches_its_full_path():
    """Hidden states come back from ``return_hidden`` as float32 copies of bfloat16 values, and go
    back to bfloat16 before the head, as the full path's matmul reads them. Gradient tolerance
    ``BF16_TOL`` (see there)."""
    model = llmjax.build("llama3-tiny", n_layers=1, dtype="bfloat16")
    params = model.init(jax.random.key(0))
    _compare_steps(model, params, _batch(model), grad_tol=BF16_TOL)


def test_mixture_of_experts_keeps_its_router_losses():
    model = llmjax.build("mixtral-tiny", n_layers=1)
    params = model.init(jax.random.key(0))
    aux = _compare_steps(model, params, _batch(model))
    assert {"moe/balance_loss", "moe/router_z_loss"} <= set(aux)


def test_lora_and_quantized_heads():
    """LoRA's default targets leave lm_head a plain frozen array, here over an int8 base whose
    lm_head is quantized too (QLoRA keeping nothing in float): dequantized as the full path
    does. An adapter on lm_head is merged as the full path merges it; its gradient matches."""
    from llmjax.inference.quantize import quantize
    from llmjax.lora import LoraConfig, apply_lora, init_lora

    model = llmjax.build("llama3-tiny", n_layers=1)
    base = model.init(jax.random.key(0))
    batch = _batch(model)
    for cfg, frozen in [
        (LoraConfig(rank=4), quantize(model, base, "int8")),
        (LoraConfig(rank=4, targets=r"lm_head|layers\.0\.attn\.wq"), base),
    ]:
        adapters = init_lora(model, cfg, jax.random.key(1))
        # b starts at 0; a random b makes the adapter change the head and gives a a gradient.
        adapters = jax.tree.map(
            lambda x: 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), adapters
        )

        def vg(chunk, frozen=frozen, cfg=cfg):
            f = next_token_loss(model, accuracy=True, chunk=chunk)
            loss = lambda a: f(apply_lora(frozen, a, cfg), {}, batch, None)  # noqa: E731
            return jax.value_and_grad(loss, has_aux=True)

        both = jax.jit(lambda a, vg=vg: (vg(8)(a), vg(0)(a)))
        ((value, _), grads), ((ref, _), ref_grads) = both(adapters)
        assert "lm_head" in grads or "lm_head" not in cfg.targets
        _close(value, ref)
        _trees_close(grads, ref_grads)


def test_target_logprobs_equal_sequence_and_token_logprobs():
    """What preference tuning sums per sequence and what RL reads per token (at a sampling
    temperature), without the logits."""
    model = llmjax.build("gemma2-tiny", n_layers=1, final_logit_softcap=0.1)
    params = model.init(jax.random.key(0))
    b = _batch(model)
    inputs = {"positions": b["positions"], "segment_ids": b["segment_ids"]}
    mask = b["loss_mask"]

    @jax.jit
    def both(params):
        logp = target_logprobs(model, params, b["tokens"], b["targets"], mask, chunk=8, **inputs)
        logits = model.apply(params, b["tokens"], **inputs)
        ref = sequence_logprobs(logits, b["targets"], mask)
        hot = target_logprobs(
            model, params, b["tokens"], b["targets"], temperature=0.7, chunk=8, **inputs
        )
        t = jnp.where(mask > 0, b["targets"], 0)
        ref_hot = jax.nn.log_softmax(logits / 0.7)
        ref_hot = jnp.take_along_axis(ref_hot, t[..., None], axis=-1)[..., 0]
        return (
            (logp * mask).sum(-1),
            ref,
            jnp.where(mask > 0, hot, 0),
            jnp.where(mask > 0, ref_hot, 0),
        )

    seq, ref, hot, ref_hot = both(params)
    _close(seq, ref)
    _close(hot, ref_hot)


def test_preference_pairs_and_rollouts_match_full_logits():
    """The recipes' own calls: a preference pair's summed log-probs and their gradient
    (``pair_logps``), and RL's per-token log-probs at the sampling temperature
    (``rollout_logprobs``), chunked against ``loop.ce_chunk=0``."""
    from types import SimpleNamespace

    from llmjax.recipes.pairs import pair_logps
    from llmjax.recipes.rl import rollout_logprobs

    model = llmjax.build("llama3-tiny", n_layers=1)
    params = model.init(jax.random.key(0))
    b = _batch(model)
    pairs = {k: jnp.stack([b[k], b[k][::-1]], axis=1) for k in b}  # [B, 2, T]

    def summed(chunk):
        return jax.value_and_grad(
            lambda p: pair_logps(model, p, pairs, chunk=chunk)[0].sum(), allow_int=True
        )

    def rollout(chunk):
        cfg = SimpleNamespace(temperature=0.7, loop=SimpleNamespace(ce_chunk=chunk))
        return rollout_logprobs(cfg, model, params, {**b, "targets": jnp.maximum(b["targets"], 0)})

    (value, grads), (ref, ref_grads) = jax.jit(lambda p: (summed(8)(p), summed(0)(p)))(params)
    _close(value, ref)
    _trees_close(grads, ref_grads)
    _close(
        pair_logps(model, params, pairs, chunk=8)[1], pair_logps(model, params, pairs, chunk=0)[1]
    )
    hot, ref_hot = jax.jit(lambda: (rollout(8), rollout(0)))()
    _close(hot, ref_hot)


def test_compiled_memory_stays_below_one_logits_array():
    """V = 32768, D = 32, 1024 tokens: one float32 [B, T, V] array is 128 MiB. XLA's temporary
    buffers for the gradient of the full loss hold at least two of them; the chunked loss (chunks
    of 128 tokens) holds one [128, V] block and the head's float32 gradient accumulator."""
    model = llmjax.build(
        "llama3-tiny", vocab_size=32768, d_model=32, n_heads=2, n_kv_heads=1, mlp_dim=64, n_layers=1
    )
    params = model.abstract_params()
    B, T = 2, 512
    ints = jax.ShapeDtypeStruct((B, T), jnp.int32)
    batch = {k: ints for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = jax.ShapeDtypeStruct((B, T), jnp.float32)
    one_logits = B * T * model.config.vocab_size * 4

    def temp_bytes(chunk):
        f = next_token_loss(model, chunk=chunk)
        g = jax.jit(jax.grad(lambda p, b: f(p, {}, b, None)[0]))
        return g.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(0), temp_bytes(128)
    assert full > one_logits > chunked, (full, one_logits, chunked)


# --- sharded meshes (a subprocess with 8 devices) -----------------------------------------------


@pytest.mark.slow  # about a minute: 8 devices on one core
def test_sharded_meshes_match_one_device():
    """Chunks of 8 tokens per device (so four scan steps on every device) on a data mesh and an
    fsdp x tensor mesh (tokens split 4 ways, the vocabulary 2 ways): the loss and every gradient
    equal the single-device full path. The default sharding tests run the loss with one chunk
    per device (``tests/sharding/test_sharding.py``)."""
    from tests.sharding.util import run_module

    for mesh, err in run_module("tests.test_chunked_ce", ["--devices", "8"]).items():
        assert err <= TOL, f"{mesh}: {err:.2e}"


def _sharded_main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", args.devices)
    import optax

    from llmjax import sharding
    from llmjax.train.mesh import state_shardings

    model = llmjax.build("gemma2-tiny", n_layers=1, final_logit_softcap=0.1)
    params = model.init(jax.random.key(0))
    batch = _batch(model, B=8, T=32)
    (ref, _), ref_grads = jax.jit(_value_and_grad(model, 0))(params, batch)
    out = {}
    for spec, rules in [("data=8", "dp"), ("fsdp=4,tensor=2", "fsdp_tp")]:
        mesh = sharding.MeshConfig.parse(spec).build(jax.devices())
        shardings = state_shardings(model, optax.sgd(0.1), mesh, rules)["params"]
        placed = jax.device_put(params, shardings)
        with sharding.activation_rules(mesh, rules):
            step = jax.jit(_value_and_grad(model, 8))
            (loss, _), grads = step(placed, sharding.shard_batch(batch, mesh))
        errs = [abs(float(loss) - float(ref)) / abs(float(ref))]
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
            errs.append(float(jnp.abs(g - r).max() / jnp.abs(r).max()))
        out[spec] = max(errs)
    print("RESULT " + json.dumps(out))
    os._exit(0)


if __name__ == "__main__":
    _sharded_main()
