"""Scanned layers: the plan of what repeats, and scanned == unrolled in every use of the params."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import llmjax
from llmjax.config import ConfigError, ModelConfig
from llmjax.errors import InputError
from llmjax.inference.quantize import quantize
from llmjax.lora import LoraConfig, init_lora
from llmjax.models.scan import ScanPlan, scan_plan, stack_layers, unstack_layers
from llmjax.train.optim import decay_mask

# Unrolled here; each test builds the scanned twin with scan_layers=True.
SMALL = dict(
    vocab_size=61,
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    mlp_dim=48,
    tie_embeddings=False,
    scan_layers=False,
)
CONFIGS = {
    # Every layer alike: one block per scan step.
    "llama": ModelConfig(n_layers=4, **SMALL),
    # Two local, one global: a period of 3 repeated twice and two unrolled layers after it.
    "local-global": ModelConfig(
        n_layers=8,
        layer_pattern=("local", "local", "global"),
        sliding_window=4,
        post_norms=True,
        qk_norm=True,
        local_rope=llmjax.config.RopeConfig(theta=100.0),
        **SMALL,
    ),
    # A dense layer among MoE layers: layers 0-1 unrolled, 2-5 scanned.
    "moe": ModelConfig(
        n_layers=6,
        n_experts=4,
        experts_per_token=2,
        dense_layers=(1,),
        router_aux_coef=0.01,
        router_z_coef=0.001,
        **SMALL,
    ),
}


def _pair(name, **overrides):
    cfg = CONFIGS[name].replace(**overrides)
    plain, scanned = llmjax.build(cfg), llmjax.build(cfg, scan_layers=True)
    params = plain.init(jax.random.key(0))
    return plain, scanned, params, stack_layers(scanned.config, params)


def _tokens(B=2, T=11, V=61, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, T)), jnp.int32)


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


@pytest.mark.parametrize(
    "name,n_layers,pattern,dense,plan",
    [
        ("uniform", 32, ("global",), (), ScanPlan(32, 0, 1, 32)),
        ("gemma3-1b", 26, ("local",) * 5 + ("global",), (), ScanPlan(26, 0, 6, 4)),
        ("gemma2", 26, ("local", "global"), (), ScanPlan(26, 0, 2, 13)),
        ("dense-first", 8, ("global",), (0, 1), ScanPlan(8, 2, 1, 6)),
        ("dense-inside", 6, ("global",), (1,), ScanPlan(6, 2, 1, 4)),
        ("one-layer", 1, ("global",), (), ScanPlan(1)),
    ],
)
def test_scan_plan(name, n_layers, pattern, dense, plan):
    moe = dict(n_experts=4) if dense else {}
    cfg = ModelConfig(
        n_layers=n_layers,
        layer_pattern=pattern,
        sliding_window=8,
        dense_layers=dense,
        **moe,
        **{**SMALL, "scan_layers": True},
    )
    assert scan_plan(cfg) == plan
    assert scan_plan(cfg.replace(scan_layers=False)).repeats == 0


def test_stacked_layout_and_axes():
    _, scanned, params, stacked = _pair("local-global")
    abstract = scanned.abstract_params()
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda x: x.shape, abstract)
    assert sorted(abstract["layers"]) == [6, 7] and sorted(abstract["blocks"]) == [0, 1, 2]
    assert abstract["blocks"][2]["attn"]["wq"].shape == (2, 32, 4, 8)
    assert scanned.param_axes()["blocks"][0]["attn"]["wq"] == (
        "layers",
        "embed",
        "heads",
        "head_dim",
    )
    assert scanned.param_axes()["layers"][6]["attn"]["wq"] == ("embed", "heads", "head_dim")
    np.testing.assert_array_equal(
        stacked["blocks"][1]["mlp"]["up"][1], params["layers"][4]["mlp"]["up"]
    )
    back = unstack_layers(scanned.config, stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert _max_diff(back, params) == 0.0
    assert scanned.num_params() == llmjax.build(CONFIGS["local-global"]).num_params()


@pytest.mark.parametrize(
    "name,remat",
    [("llama", "none"), ("local-global", "full"), ("local-global", "dots"), ("moe", "none")],
)
def test_scanned_equals_unrolled(name, remat):
    """Logits, auxiliary losses and gradients of every parameter, under jit."""
    plain, scanned, params, stacked = _pair(name, remat=remat)
    tokens = _tokens()

    def loss(model):
        def f(p):
            logits, aux = model.apply(p, tokens, return_aux=True)
            extra = sum(aux.values()) if aux else 0.0
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * logits[..., 1]) + extra, (
                logits,
                aux,
            )

        return jax.jit(jax.value_and_grad(f, has_aux=True))

    (la, (logits_a, aux_a)), ga = loss(plain)(params)
    (lb, (logits_b, aux_b)), gb = loss(scanned)(stacked)
    assert float(jnp.abs(logits_a - logits_b).max()) <= 1e-5
    assert abs(float(la - lb)) <= 1e-5
    assert set(aux_a) == set(aux_b) and _max_diff(aux_a, aux_b) <= 1e-6 if aux_a else True
    assert _max_diff(ga, unstack_layers(scanned.config, gb)) <= 1e-5


@pytest.mark.parametrize(
    "name,ring",
    [("local-global", True), pytest.param("moe", False, marks=pytest.mark.slow)],
)
def test_cache_decode_with_scanned_params(name, ring):
    """Prefill then one token at a time on a scanned model equals its full forward."""
    _, scanned, _, stacked = _pair(name)
    tokens = _tokens(T=10)
    full = scanned.apply(stacked, tokens)
    cache = scanned.init_cache(2, 16, ring=ring)
    out, cache = scanned.apply(stacked, tokens[:, :6], cache=cache)
    outs = [out]
    for t in range(6, 10):
        out, cache = jax.jit(scanned.apply)(stacked, tokens[:, t : t + 1], cache=cache)
        outs.append(out)
    assert float(jnp.abs(jnp.concatenate(outs, axis=1) - full).max()) <= 1e-5


def test_sampling_decodes_scanned_models_unrolled():
    """generate and rollout (under jit) slice a scanned model's stacks once per call and decode unrolled: the same tokens and log-probs as the unrolled model."""
    from llmjax.inference.rollout import rollout
    from llmjax.inference.sampler import for_decoding, generate

    plain, scanned, params, stacked = _pair("llama")
    model, unstacked = for_decoding(scanned, stacked)
    assert not model.config.scan_layers and _max_diff(unstacked, params) == 0.0
    assert for_decoding(scanned, stacked)[0] is model  # one model object: no recompiles
    assert for_decoding(plain, params) == (plain, params)
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = generate(plain, params, prompts, max_new_tokens=9, temperature=1.0, seed=3)
    b = generate(scanned, stacked, prompts, max_new_tokens=9, temperature=1.0, seed=3)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    tokens, lengths = jnp.asarray([[1, 2, 3, 4], [5, 6, 0, 0]]), jnp.asarray([4, 2])
    roll = jax.jit(
        lambda m, p: rollout(m, p, tokens, lengths, jax.random.key(0), max_new=7),
        static_argnums=0,
    )
    r1, r2 = roll(plain, params), roll(scanned, stacked)
    assert np.array_equal(r1.tokens_BN, r2.tokens_BN)
    assert float(jnp.abs(r1.logprobs_BN - r2.logprobs_BN).max()) <= 1e-6


@pytest.mark.slow  # about 10 s: two speculative decoders compiled
def test_speculative_decoding_of_scanned_models_equals_unrolled():
    from llmjax.inference.speculative import speculative_generate

    plain, scanned, params, stacked = _pair("llama")
    prompts = [[1, 2, 3, 4], [5, 6]]
    s1 = speculative_generate(plain, params, plain, params, prompts, max_new_tokens=6)
    s2 = speculative_generate(scanned, stacked, scanned, stacked, prompts, max_new_tokens=6)
    assert s1.tokens == s2.tokens


def test_training_step_equals_unrolled():
    """One SGD step with masked weight decay: stacked norms are not decayed, as unrolled ones are
    not. (SGD: Adam's first step is about lr * sign(g), which turns summation-order noise in
    near-zero gradients into differences of order lr.)"""
    plain, scanned, params, stacked = _pair("local-global")
    mask = decay_mask(stacked)
    assert mask["blocks"][0]["attn_norm"]["scale"] is False
    assert mask["blocks"][0]["attn"]["wq"] is True
    plain_mask = decay_mask(params)
    for j, block in mask["blocks"].items():
        assert block == plain_mask["layers"][scan_plan(scanned.config).layer(0, j)]
    tokens = _tokens()
    tx = optax.chain(optax.add_decayed_weights(0.1, mask=decay_mask), optax.sgd(1e-1))

    @functools.partial(jax.jit, static_argnums=0)
    def step(model, p):
        g = jax.grad(lambda p: -jnp.mean(jax.nn.log_softmax(model.apply(p, tokens))[..., 3]))(p)
        updates, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, updates)

    a = step(plain, params)
    b = unstack_layers(scanned.config, step(scanned, stacked))
    assert _max_diff(a, b) <= 1e-6


def test_hlo_size_flat_in_depth():
    """The traced train step holds one block whatever the depth; unrolled it holds every layer."""
    tokens = jax.ShapeDtypeStruct((2, 16), jnp.int32)

    def hlo_chars(n_layers, scan):
        model = llmjax.build(CONFIGS["llama"], n_layers=n_layers, scan_layers=scan)
        grad = jax.grad(lambda p, t: model.apply(p, t).mean())
        return len(jax.jit(grad).lower(model.abstract_params(), tokens).as_text())

    scanned = [hlo_chars(n, True) for n in (2, 8)]
    unrolled = [hlo_chars(n, False) for n in (2, 8)]
    assert scanned[1] < 1.05 * scanned[0], scanned
    assert unrolled[1] > 2 * unrolled[0], unrolled


def test_conversions_refuse_the_wrong_layout():
    _, scanned, params, stacked = _pair("llama")
    with pytest.raises(InputError, match="unrolled"):
        unstack_layers(scanned.config, params)
    with pytest.raises(InputError, match="scanned"):
        stack_layers(scanned.config, stacked)
    with pytest.raises(InputError, match=r"lacks layers \[3\]"):
        stack_layers(
            scanned.config, {**params, "layers": {i: params["layers"][i] for i in range(3)}}
        )


@pytest.mark.parametrize(
    "args,meshes,spec",
    [
        (["--preset", "llama3-tiny"], ["data=1:dp", "fsdp=4,tensor=2:fsdp_tp"], "wq_spec"),
        pytest.param(
            ["--preset", "mixtral-tiny", "--experts", "8"],
            ["data=1:dp", "fsdp=2,expert=4:ep"],
            "gate_spec",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["fsdp_tp", "ep"],
)
def test_sharded_scanned_training_matches_one_device(args, meshes, spec):
    """8 simulated devices: the stack axis stays whole, the others shard as unrolled, and the
    expert-parallel dispatch runs inside the scan."""
    from tests.sharding.util import run_module

    meshes_args = sum((["--mesh", m] for m in meshes), [])
    results = run_module(
        "tests.sharding.run_meshes", ["--devices", "8", "--scan", *args, *meshes_args]
    )
    ref, sharded = results[meshes[0]], results[meshes[1]]
    assert ref["losses"][-1] < ref["losses"][0]
    np.testing.assert_allclose(sharded["losses"], ref["losses"], rtol=2e-6)
    expected = {
        "wq_spec": "(None, 'fsdp', 'tensor', None)",
        "gate_spec": "(None, 'expert', 'fsdp', None)",
    }
    assert sharded[spec] == expected[spec]
    assert sharded.get("expert_parallel", True)


def _lora_pair(targets=None, name="local-global"):
    """Adapters with a random ``b`` (so they change the model) for the unrolled and the scanned
    local-global model, the same numbers in both layouts."""
    plain, scanned, params, stacked = _pair(name)
    cfg = LoraConfig(rank=4) if targets is None else LoraConfig(rank=4, targets=targets)
    adapters = init_lora(plain, cfg, jax.random.key(3))
    adapters = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), adapters)
    return (
        plain,
        scanned,
        params,
        stacked,
        cfg,
        adapters,
        stack_layers(scanned.config, adapters, True),
    )


def test_lora_on_scanned_blocks_equals_unrolled():
    """Stacked adapters ``a [R, I..., r]``, ``b [R, r, O...]`` ride through the scan: logits and
    adapter gradients equal the unrolled model's; merge equals too; dropout runs per layer."""
    from llmjax.lora import apply_lora, lora_axes, merge

    plain, scanned, params, stacked, cfg, ad, ad_s = _lora_pair()
    fresh = init_lora(scanned, cfg, jax.random.key(3))
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, ad_s)
    assert fresh["blocks"][0]["attn"]["wq"]["a"].shape == (2, 32, 4)
    assert lora_axes(scanned, cfg)["blocks"][0]["attn"]["wq"]["b"] == (
        "layers",
        None,
        "heads",
        "head_dim",
    )
    tokens = _tokens()

    def loss(model, base):
        return lambda a: jnp.mean(model.apply(apply_lora(base, a, cfg), tokens) ** 2)

    la, ga = jax.jit(jax.value_and_grad(loss(plain, params)))(ad)
    lb, gb = jax.jit(jax.value_and_grad(loss(scanned, stacked)))(ad_s)
    assert abs(float(la - lb)) <= 1e-6
    assert _max_diff(ga, unstack_layers(scanned.config, gb)) <= 1e-6
    merged = unstack_layers(scanned.config, merge(stacked, ad_s, cfg))
    assert _max_diff(merged, merge(params, ad, cfg)) <= 1e-7
    drop = dataclasses.replace(cfg, dropout=0.5)
    noisy = scanned.apply(apply_lora(stacked, ad_s, drop, key=jax.random.key(1)), tokens)
    clean = scanned.apply(apply_lora(stacked, ad_s, drop), tokens)
    assert bool(jnp.isfinite(noisy).all()) and float(jnp.abs(noisy - clean).max()) > 1e-4


@pytest.mark.parametrize("mode", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_qlora_quantizes_each_repeat_as_unrolled(mode):
    """``quantize`` vmaps over the stack: the same codes and scales per layer, the same logits
    through ``QuantizedModel`` and under adapters (QLoRA)."""
    from llmjax.inference.quantize import QuantizedModel, dequantize
    from llmjax.lora import apply_lora

    plain, scanned, params, stacked, cfg, ad, ad_s = _lora_pair()
    q_plain = quantize(plain, params, mode, group_size=16, keep="lm_head")
    q_scan = quantize(scanned, stacked, mode, group_size=16, keep="lm_head")
    assert q_scan["blocks"][0]["attn"]["wq"].stacked
    assert _max_diff(unstack_layers(scanned.config, dequantize(q_scan)), dequantize(q_plain)) == 0
    tokens = _tokens()
    a = QuantizedModel(plain).apply(q_plain, tokens)
    b = jax.jit(QuantizedModel(scanned).apply)(q_scan, tokens)
    assert float(jnp.abs(a - b).max()) <= 1e-5
    a = plain.apply(apply_lora(q_plain, ad, cfg), tokens)
    b = jax.jit(scanned.apply)(apply_lora(q_scan, ad_s, cfg), tokens)
    assert float(jnp.abs(a - b).max()) <= 1e-5


def test_peft_round_trip_through_a_scanned_model(tmp_path):
    from llmjax.interop.peft import from_peft, to_peft

    plain, scanned, _, _, cfg, ad, ad_s = _lora_pair(r"layers\.\d+\.(attn\.wq|mlp\.down)", "llama")
    to_peft(scanned, ad_s, cfg, tmp_path / "peft")
    back_plain, cfg_plain = from_peft(tmp_path / "peft", plain)
    back_scan, cfg_scan = from_peft(tmp_path / "peft", scanned)
    assert cfg_plain == cfg_scan
    assert _max_diff(back_plain, ad) == 0.0 and _max_diff(back_scan, ad_s) == 0.0


def test_regexes_select_whole_stacks_or_refuse():
    """LoRA targets, trainable patterns and quantization's keep read per-layer paths; one that
    splits a stacked block's repeats is refused with the fix."""
    from llmjax.train.task import split_trainable

    _, scanned, _, stacked = _pair("local-global")
    trained, rest = split_trainable(stacked, r"layers\.\d+\.mlp\..*", scanned.config)
    assert set(trained["blocks"][0]) == {"mlp"} and set(trained["layers"][6]) == {"mlp"}
    assert "mlp" not in rest["blocks"][0]
    with pytest.raises(
        ConfigError, match=r"selects layers \['0'\] of blocks.0.attn.wq but not \['3'\]"
    ):
        init_lora(scanned, LoraConfig(targets=r"layers\.0\.attn\.wq"), jax.random.key(0))
    with pytest.raises(ConfigError, match="trainable pattern.*scan_layers=False"):
        split_trainable(stacked, r"layers\.[0-2]\..*", scanned.config)
    with pytest.raises(ConfigError, match="quantize keep"):
        quantize(scanned, stacked, "int8", keep=r"layers\.1\..*")


@pytest.mark.parametrize("preset", ["llama3.1-8b", "gemma3-1b", "gemma2-9b", "qwen3-30b-a3b"])
def test_full_size_presets_scan(preset):
    """Abstract shapes only: the same parameter count, and most layers in the scan."""
    unrolled = llmjax.build(preset)
    scanned = llmjax.build(preset, scan_layers=True)
    plan = scan_plan(scanned.config)
    assert scanned.num_params() == unrolled.num_params()
    assert scanned.num_active_params() == unrolled.num_active_params()
    assert plan.repeats >= 2 and len(plan.unrolled) < plan.period + 2


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral"])
def test_hf_checkpoints_load_and_save_scanned(tmp_path, family):
    """from_hf stacks at load, to_hf unstacks at save: logits match transformers (<= 1e-4) and
    the written checkpoint is the unrolled model's, tensor for tensor."""
    from tests.hf_util import build_hf, hf_logits, random_tokens

    hf = build_hf(family, num_hidden_layers=4)
    hf.save_pretrained(tmp_path / "hf")
    model, params = llmjax.from_hf(tmp_path / "hf", scan_layers=True)
    assert scan_plan(model.config).repeats >= 2 and "blocks" in params
    tokens = random_tokens(2, 13)
    diff = np.abs(np.asarray(model.apply(params, tokens)) - hf_logits(hf, tokens)).max()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    llmjax.to_hf(model, params, tmp_path / "out")
    _, plain = llmjax.from_hf(tmp_path / "out")
    _, reference = llmjax.from_hf(tmp_path / "hf")
    assert _max_diff(plain, reference) == 0.0


@pytest.mark.slow  # about 30 s: two training runs, generate and export
def test_cli_pretrain_scanned_resumes_generates_and_exports(tmp_path):
    """``llmjax pretrain`` (scanned by default) as a user types it (relative paths, from the
    run's parent): it trains, resumes to more steps, generates and exports a checkpoint that
    loads unrolled with the same logits."""
    from llmjax.cli import main
    from llmjax.runs import load_run
    from tests.train.test_resume import finish, launch, losses

    out = tmp_path / "run"
    code, log = finish(launch(out, steps=5))
    assert code == 0, log[-2000:]
    code, log = finish(launch(out, steps=8))
    assert code == 0 and "resumed from run/checkpoints/5 (step 5)" in log, log[-2000:]
    assert sorted(losses(out)) == list(range(1, 9))
    run = load_run(str(out))
    assert run.model.config.scan_layers and "blocks" in run.params
    assert main(["generate", "--ckpt", str(out), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert main(["export", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    model, params = llmjax.from_hf(tmp_path / "hf", scan_layers=False)
    tokens = _tokens(V=model.config.vocab_size)
    expected = run.model.apply(run.params, tokens)
    assert float(jnp.abs(model.apply(params, tokens) - expected).max()) <= 1e-5


def test_hf_scorer_loads_and_saves_scanned(tmp_path):
    """A reward model's ``...ForSequenceClassification`` directory through the same boundary."""
    from llmjax.interop.hf_score import from_hf_scorer, to_hf_scorer
    from llmjax.scalar_head import sequence_scores
    from tests.hf_util import build_hf, torch

    hf = build_hf("llama", cls="LlamaForSequenceClassification", num_labels=1, pad_token_id=0)
    hf.save_pretrained(tmp_path / "hf")
    model, params, head = from_hf_scorer(tmp_path / "hf", scan_layers=True)
    assert "blocks" in params and "lm_head" not in params
    tokens = np.asarray(_tokens(V=model.config.vocab_size - 1)) + 1  # no pad id inside
    with torch.no_grad():
        want = hf(torch.as_tensor(tokens)).logits[:, 0].numpy()
    got = np.asarray(sequence_scores(model, params, head, tokens))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    to_hf_scorer(model, params, head, tmp_path / "out", pad_token_id=0)
    _, plain, plain_head = from_hf_scorer(tmp_path / "out")
    _, reference, _ = from_hf_scorer(tmp_path / "hf")
    assert _max_diff(plain, reference) == 0.0 and _max_diff(plain_head, head) == 0.0


def test_a_run_resumes_in_the_other_layout(tmp_path):
    """A run saved unrolled (every run before scanning became the default) resumes scanned, and
    with every layer rematerialised: the checkpoint is read in its own layout and converted,
    optimizer moments included, and the steps after it match the unrolled run's."""
    from llmjax.recipes import pretrain
    from llmjax.runs import load_run
    from tests.train.helpers import small_config
    from tests.train.test_resume import losses

    def config(scan, steps, remat="none"):
        cfg = small_config(steps=steps, save_every=2)
        return dataclasses.replace(cfg, model=cfg.model.replace(scan_layers=scan, remat=remat))

    logs, quiet = [], lambda *a, **k: None
    for out in ("ref", "run"):  # the same 2 steps, resumed unrolled and scanned to 4
        pretrain.run(config(False, 2), tmp_path / out, log=quiet)
    pretrain.run(config(False, 4), tmp_path / "ref", log=quiet)
    pretrain.run(config(True, 4, "full"), tmp_path / "run", log=lambda *a, **k: logs.append(a[0]))
    assert any(str(m).startswith("resumed from") for m in logs), logs
    ref, run = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert sorted(run) == [1, 2, 3, 4]
    for step in (3, 4):  # scanned and unrolled steps agree to float rounding, not bit for bit
        np.testing.assert_allclose(run[step][:2], ref[step][:2], rtol=1e-5)
    resumed, plain = load_run(tmp_path / "run"), load_run(tmp_path / "ref")
    assert "blocks" in resumed.params and "blocks" not in plain.params
    assert _max_diff(unstack_layers(resumed.model.config, resumed.params), plain.params) < 1e-5


def test_relayout_converts_optimizer_state_both_ways():
    from llmjax.models.scan import relayout

    cfg = CONFIGS["local-global"]
    params = llmjax.build(cfg).init(jax.random.key(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, mask=decay_mask))
    state = tx.init(params)
    stacked = relayout(cfg, state, True)
    assert stacked[1][0].mu["blocks"][0]["attn"]["wq"].shape[0] == 2  # two repeats of 3
    assert jax.tree.structure(stacked) == jax.tree.structure(
        tx.init(stack_layers(cfg.replace(scan_layers=True), params))
    )
    back = relayout(cfg, stacked, False)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert _max_diff(back, state) == 0.0
