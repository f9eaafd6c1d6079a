import dataclasses

import jax
import pytest

import llmjax
from llmjax.config import ConfigError
from llmjax.recipes import pretrain
from llmjax.train import override, valid_keys
from llmjax.train.config import closest_keys
from llmjax.train.mesh import make_mesh
from llmjax.train.optim import lr_schedule


@pytest.mark.parametrize("name", sorted(pretrain.RECIPES))
def test_every_recipe_builds(name):
    cfg = pretrain.get(name)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.data.tokenizer_config.vocab_size <= cfg.model.vocab_size
    llmjax.build(cfg.model)  # abstract shapes only: no parameters are allocated


def test_overrides_are_typed_and_validated():
    cfg = pretrain.get("default")
    cfg = override(cfg, "optim.lr=1e-3")
    cfg = override(cfg, "loop.keep_best=false")
    cfg = override(cfg, "model.n_layers=3")
    cfg = override(cfg, "data.paths=a.txt,b.jsonl")
    cfg = override(cfg, "model.rope.theta=10000")
    cfg = override(cfg, "data.tokenizer_config.model_type=unigram")
    assert (cfg.optim.lr, cfg.loop.keep_best, cfg.model.n_layers) == (1e-3, False, 3)
    assert cfg.data.paths == ("a.txt", "b.jsonl") and cfg.model.rope.theta == 10000.0
    assert isinstance(cfg.model.rope.theta, float)
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim.learning_rate'; did you mean optim.lr\?$"
    ):
        override(cfg, "optim.learning_rate=1")
    with pytest.raises(ConfigError, match="expected int"):
        override(cfg, "loop.steps=1.5")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        override(cfg, "model.n_kv_heads=3")  # the model config's own validation runs
    with pytest.raises(ConfigError, match="beyond the model's max_seq_len"):
        override(cfg, "data.seq_len=4096")
    with pytest.raises(ConfigError, match="optim.schedule"):
        override(cfg, "optim.schedule=step")
    assert "model.rope.theta" in valid_keys(cfg) and "loop.z_loss" in valid_keys(cfg)


@pytest.mark.parametrize(
    "key, suggested",
    [
        ("optim.learning_rate", ["optim.lr"]),  # another trainer's name for the field
        ("lr", ["optim.lr"]),  # the section left out
        ("steps", ["loop.steps"]),
        ("data.steps", ["loop.steps"]),  # the wrong section
        ("optim.warmup", ["optim.warmup_steps"]),
        ("loop.step", ["loop.steps"]),  # a typo: similar whole keys first
        ("model.n_layer", ["model.n_layers"]),
        ("tokenizer.vocab_size", ["data.tokenizer_config.vocab_size", "model.vocab_size"]),
    ],
)
def test_an_unknown_key_suggests_the_closest(key, suggested):
    cfg = pretrain.get("default")
    assert closest_keys(key, valid_keys(cfg))[: len(suggested)] == suggested
    with pytest.raises(ConfigError) as info:
        override(cfg, f"{key}=1")
    message = str(info.value)
    assert message.startswith(f"unknown config key {key!r}; did you mean {suggested[0]}")
    assert "valid keys" not in message and len(message) < 200  # a suggestion, not all 80 keys


def test_unusable_overrides_say_what_to_write():
    cfg = pretrain.get("default")
    with pytest.raises(
        ConfigError, match="--set 'optim.lr' has no '=': write --set optim.lr=VALUE"
    ):
        override(cfg, "optim.lr")
    with pytest.raises(ConfigError, match="has no '=': write --set KEY=VALUE, e.g. optim.lr=1e-3"):
        override(cfg, "learning-rate")
    with pytest.raises(ConfigError, match="the key before '=' is empty"):
        override(cfg, "=3")
    with pytest.raises(ConfigError, match="'optim' is a section, not a field; .* optim.lr"):
        override(cfg, "optim=3")
    with pytest.raises(ConfigError, match="keys are SECTION.FIELD with sections model, data"):
        override(cfg, "zzz=3")


def test_with_preset_fits_tokenizer_and_length():
    cfg = pretrain.with_preset(pretrain.get("default"), "gpt2-tiny")
    assert cfg.model.name == "gpt2-tiny"
    assert cfg.data.seq_len == 128 and cfg.data.tokenizer_config.vocab_size == 512


def test_schedule_warmup_then_decay():
    cfg = dataclasses.replace(
        pretrain.get("default").optim, lr=1.0, warmup_steps=10, min_lr_ratio=0.1
    )
    f = lr_schedule(cfg, 110)
    assert float(f(0)) == pytest.approx(0.1) and float(f(9)) == pytest.approx(1.0)
    assert float(f(60)) == pytest.approx(0.55, abs=0.02)  # cosine midpoint
    assert float(f(110)) == pytest.approx(0.1)
    lin = lr_schedule(dataclasses.replace(cfg, schedule="linear"), 110)
    assert float(lin(60)) == pytest.approx(0.55)


def test_mesh_spec():
    mesh = make_mesh("")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}
    for bad, msg in [
        ("data=2,tensor=3", "devices but there are 1"),
        ("data=-1,fsdp=-1", "at most one"),
        ("pipe=2", "unknown axis 'pipe'"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            make_mesh(bad)


def test_state_shardings_follow_the_parameters():
    from jax.sharding import PartitionSpec

    from llmjax.sharding.planner import abstract_mesh
    from llmjax.train import OptimizerConfig, init_state, make_optimizer
    from llmjax.train.mesh import rules_for, state_shardings

    mesh = abstract_mesh({"data": 1, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 2})
    model = llmjax.build("llama3-tiny")
    tx = make_optimizer(OptimizerConfig(), 10)
    abstract = jax.eval_shape(lambda: init_state(model, tx, 0))
    assert rules_for(mesh) == "fsdp_tp"
    sh = state_shardings(model, tx, mesh, rules_for(mesh))
    params = jax.tree.leaves(sh["params"])
    assert any("fsdp" in str(s.spec) for s in params) and any(
        "tensor" in str(s.spec) for s in params
    )
    # Every sharded dimension is divisible by its mesh axes.
    for a, s in zip(jax.tree.leaves(abstract["params"]), params, strict=True):
        for dim, axis in zip(a.shape, s.spec, strict=False):
            if axis is not None:
                assert dim % mesh.shape[axis] == 0
    # Adam's moments are sharded exactly like their parameters; the step count is replicated.
    mu = sh["opt_state"][1][0].mu
    assert jax.tree.map(lambda s: s.spec, mu) == jax.tree.map(lambda s: s.spec, sh["params"])
    assert sh["step"].spec == PartitionSpec()


def test_a_checkpoint_from_before_a_new_model_field_still_matches():
    """A field added since a checkpoint was written (the MoE fields, say) takes its default there:
    the run resumes instead of being refused as another model."""
    from llmjax.train.config import to_dict
    from llmjax.train.loop import model_differences

    model = llmjax.presets.get("llama3-tiny")
    saved = to_dict(model)
    for field in ("n_experts", "experts_per_token", "router", "dense_layers"):
        saved.pop(field)
    assert model_differences(model, {"config": {"model": saved}}) == []
    saved["mlp_dim"] = model.resolved_mlp_dim + 8
    assert model_differences(model, {"config": {"model": saved}}) == [
        f"mlp_dim: {model.resolved_mlp_dim + 8} -> {to_dict(model)['mlp_dim']!r}"
    ]


def test_a_checkpoint_resumes_with_another_layout_remat_or_attention_kernel():
    """How the step computes is not which model it trains; anything else that differs is named."""
    from llmjax.train.config import to_dict
    from llmjax.train.loop import model_differences

    model = llmjax.presets.get("llama3-tiny")
    saved = to_dict(model) | {"scan_layers": False, "remat": "dots", "attention_impl": "pallas"}
    assert model_differences(model, {"config": {"model": saved}}) == []
    saved["dtype"] = "bfloat16"
    assert model_differences(model, {"config": {"model": saved}}) == [
        "dtype: 'bfloat16' -> 'float32'"
    ]
