"""PEFT interop: ``to_peft`` adapters load in ``peft`` with equal logits; merged exports; errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import llmjax
from llmjax.errors import ConfigError, HFCheckpointError, InputError
from llmjax.interop.peft import from_peft, to_peft
from llmjax.lora import LoraConfig, apply_lora, init_lora, lora_targets, merge
from tests.hf_util import build_hf, hf_logits, random_tokens, transformers

peft = pytest.importorskip("peft")

TOL = 1e-4


def _trained(adapters, seed=1, std=0.1):
    """Adapters with ``b`` drawn away from zero, so that every adapter changes the logits."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _loaded(tmp_path, family, scan=False, **overrides):
    hf = build_hf(family, **overrides)
    hf.save_pretrained(tmp_path / "base")
    model, params = llmjax.from_hf(tmp_path / "base", scan_layers=scan)
    return hf, model, params


# Qwen3 (every layer alike) and Gemma 2 (local/global pairs) load scanned: their adapters are
# stacked inside llmjax and written per layer. Llama loads unrolled, as its per-layer targets need.
SCANNED = ("qwen3", "gemma2")
CASES = [
    ("llama", LoraConfig(rank=4, alpha=8.0)),
    ("llama", LoraConfig(rank=8, alpha=4.0, rslora=True, targets=r"layers\.[02]\.attn\.(wq|wv)")),
    ("qwen3", LoraConfig(rank=4, alpha=16.0, targets=r"layers\.\d+\.(attn\.wo|mlp\.down)")),
    ("gemma2", LoraConfig(rank=2, alpha=3.0)),
    ("gpt2", LoraConfig(rank=4, alpha=8.0, targets=r"layers\.\d+\.(attn\.wo|mlp\.up)")),
]


@pytest.mark.parametrize("family,cfg", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_adapters_load_in_peft_with_equal_logits(tmp_path, family, cfg):
    hf, model, params = _loaded(tmp_path, family, scan=family in SCANNED)
    adapters = _trained(init_lora(model, cfg, jax.random.key(0)))
    tokens = random_tokens(2, 11)
    ours = np.asarray(model.apply(apply_lora(params, adapters, cfg), tokens))
    assert np.abs(ours - np.asarray(model.apply(params, tokens))).max() > 0.1  # adapters matter

    to_peft(model, adapters, cfg, tmp_path / "adapter", base_model_name_or_path="tiny-base")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == cfg.rank and config["use_rslora"] == cfg.rslora
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config["fan_in_fan_out"] == (family == "gpt2")  # GPT-2's Conv1D stores [in, out]
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert np.abs(ours - hf_logits(with_adapter, tokens)).max() <= TOL

    # Back: the same arrays, and a config selecting the same weights with the same scale.
    adapters2, cfg2 = from_peft(tmp_path / "adapter", model)
    assert (cfg2.rank, cfg2.scale, cfg2.rslora) == (cfg.rank, cfg.scale, cfg.rslora)
    assert lora_targets(model, cfg2) == lora_targets(model, cfg)
    assert jax.tree.structure(adapters2) == jax.tree.structure(adapters)
    for u, v in zip(jax.tree.leaves(adapters2), jax.tree.leaves(adapters), strict=True):
        assert u.dtype == v.dtype and np.array_equal(u, v)


def test_adapter_saved_by_peft_reads_with_equal_logits(tmp_path):
    hf, model, params = _loaded(tmp_path, "mistral", scan=True)
    peft_cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["o_proj", "gate_proj"],
        init_lora_weights=False,  # random B as well as A: the adapter changes the logits
    )
    peft.get_peft_model(hf, peft_cfg).save_pretrained(tmp_path / "adapter")
    hf = build_hf("mistral")  # get_peft_model wrapped the first one in place
    with_adapter = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    adapters, cfg = from_peft(tmp_path / "adapter", model)
    assert cfg.rank == 4 and cfg.scale == 6 / 2 and cfg.rslora
    # Stored stacked: every layer's o_proj and gate_proj are one array each.
    assert lora_targets(model, cfg) == ("blocks.0.attn.wo", "blocks.0.mlp.gate")
    tokens = random_tokens(2, 11, seed=4)
    ours = np.asarray(model.apply(apply_lora(params, adapters, cfg), tokens))
    assert np.abs(ours - np.asarray(model.apply(params, tokens))).max() > 0.1
    assert np.abs(ours - hf_logits(with_adapter, tokens)).max() <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_merged_export_loads_in_transformers(tmp_path, family):
    _, model, params = _loaded(tmp_path, family)
    cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = _trained(init_lora(model, cfg, jax.random.key(2)))
    llmjax.to_hf(model, merge(params, adapters, cfg), tmp_path / "merged")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager"
    ).eval()
    tokens = random_tokens(2, 11, seed=3)
    ours = np.asarray(model.apply(apply_lora(params, adapters, cfg), tokens))
    assert np.abs(ours - hf_logits(hf, tokens)).max() <= TOL


def test_target_modules_name_exactly_the_adapted_modules(tmp_path):
    # One layer's q_proj alone: a choice per layer, which a scanned stack refuses (test_scan.py).
    model = llmjax.build("llama3-tiny", scan_layers=False)
    cfg = LoraConfig(rank=2, targets=r"layers\.0\.attn\.wq|layers\.\d+\.mlp\.up")
    to_peft(model, init_lora(model, cfg, jax.random.key(0)), cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]
    _, cfg2 = from_peft(tmp_path, model)
    assert lora_targets(model, cfg2) == lora_targets(model, cfg)


def test_fused_gpt2_attention_is_refused_before_writing(tmp_path):
    model = llmjax.build("gpt2-tiny")
    cfg = LoraConfig(rank=2)
    with pytest.raises(
        ConfigError,
        match=r"adapts layers\.N\.attn\.wk, layers\.N\.attn\.wq, layers\.N\.attn\.wv, which .* fused .*c_attn.*select among layers\.N\.attn\.wo, layers\.N\.mlp\.down, layers\.N\.mlp\.up\)",
    ):
        to_peft(model, init_lora(model, cfg, jax.random.key(0)), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Nor can a PEFT adapter of c_attn be read (its a is shared by q, k and v).
    hf, model, _ = _loaded(tmp_path, "gpt2")
    peft_cfg = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft.get_peft_model(hf, peft_cfg).save_pretrained(tmp_path / "c_attn")
    with pytest.raises(HFCheckpointError, match=r"adapts transformer\.h\.0\.attn\.c_attn, .*fused"):
        from_peft(tmp_path / "c_attn", model)


def test_adapters_that_do_not_match_are_refused(tmp_path):
    model = llmjax.build("llama3-tiny")
    cfg = LoraConfig(rank=2)
    adapters = init_lora(model, cfg, jax.random.key(0))
    with pytest.raises(InputError, match="do not match lora targets"):
        to_peft(model, adapters, LoraConfig(rank=2, targets=r"layers\.\d+\.attn\.wq"), tmp_path)
    with pytest.raises(InputError, match="rank 2 .* rank=4"):
        to_peft(model, adapters, LoraConfig(rank=4), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(HFCheckpointError, match="is an existing file"):
        to_peft(model, adapters, cfg, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unreadable_peft_directories_are_refused(tmp_path):
    model = llmjax.build("llama3-tiny")
    cfg = LoraConfig(rank=2, targets=r"layers\.\d+\.attn\.wq")
    with pytest.raises(HFCheckpointError, match="no adapter_config.json"):
        from_peft(tmp_path, model)
    to_peft(model, init_lora(model, cfg, jax.random.key(0)), cfg, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key, value, match in [
        ("use_dora", True, "use_dora=True is a PEFT feature"),
        ("peft_type", "IA3", "peft_type='IA3'"),
        ("r", 0, "r=0"),
        ("rank_pattern", {"q_proj": 4}, "rank_pattern="),
        ("use_rslora", "false", "use_rslora='false'"),
    ]:
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(HFCheckpointError, match=match):
            from_peft(tmp_path, model)
    config_file.write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(HFCheckpointError, match=r"expected \[4, 64\] and \[64, 4\] for r=4"):
        from_peft(tmp_path, model)
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        HFCheckpointError, match="no LoRA weights of the linear modules of 'qwen3-tiny'"
    ):
        from_peft(tmp_path, llmjax.build("qwen3-tiny", n_layers=1))
