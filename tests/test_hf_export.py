"""``to_hf`` writes directories that transformers loads with equal logits; bad checkpoints fail clearly."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import llmjax
from llmjax.interop.hf import CheckpointError
from llmjax.interop.hf_config import UnsupportedConfig
from llmjax.interop.safetensors import SafetensorsFile, write
from tests.hf_util import build_hf, hf_logits, random_tokens, torch, transformers

TINY = ["gpt2-tiny", "llama3-tiny", "mistral-tiny", "qwen3-tiny", "gemma2-tiny", "gemma3-tiny"]


def _randomised(model, seed=0):
    """Random params with every norm scale and bias away from its identity value."""
    params = model.init(jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.3 * jax.random.normal(k, x.shape) if x.ndim == 1 else x * 5.0
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize("preset", TINY)
def test_to_hf_loads_in_transformers_with_equal_logits(tmp_path, preset):
    model = llmjax.build(preset)
    params = _randomised(model)
    llmjax.to_hf(model, params, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert (
        type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    )
    tokens = random_tokens(2, 20, vocab=model.config.vocab_size)
    ours = np.asarray(model.apply(params, tokens))
    assert np.abs(ours - hf_logits(hf.eval(), tokens)).max() <= 1e-4
    # And back: from_hf reproduces the same config and parameters.
    model2, params2 = llmjax.from_hf(tmp_path)
    assert np.abs(np.asarray(model2.apply(params2, tokens)) - ours).max() == 0.0


def test_to_hf_shards_large_checkpoints(tmp_path):
    model = llmjax.build("llama3-tiny")
    params = _randomised(model)
    llmjax.to_hf(model, params, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens = random_tokens(1, 8, vocab=512)
    assert (
        np.abs(np.asarray(model.apply(params, tokens)) - hf_logits(hf.eval(), tokens)).max() <= 1e-4
    )


def test_inexpressible_config_is_refused(tmp_path):
    model = llmjax.build("qwen3-tiny", post_norms=True)
    params = model.init(jax.random.key(0))
    with pytest.raises(
        UnsupportedConfig, match="cannot be expressed as Gemma3ForCausalLM: norm_unit"
    ):
        llmjax.to_hf(model, params, tmp_path)
    with pytest.raises(UnsupportedConfig, match="as LlamaForCausalLM: .*qk_norm: True"):
        llmjax.to_hf(llmjax.build("qwen3-tiny"), params, tmp_path, architecture="LlamaForCausalLM")


def _saved(tmp_path, family="llama"):
    build_hf(family).save_pretrained(tmp_path)
    return tmp_path


def _rewrite(path, edit):
    """Rewrite model.safetensors after ``edit(dict name -> array)``."""
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {n: np.array(f.get(n)) for n in f.names()}
    del f
    edit(tensors)
    write(
        path / "model.safetensors",
        [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()],
    )


def test_missing_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        llmjax.from_hf(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"
    ):
        llmjax.from_hf(path)


def test_misshaped_tensor_names_expected_shape(tmp_path):
    path = _saved(tmp_path)
    _rewrite(
        path,
        lambda t: t.update(
            {"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 64), np.float32)}
        ),
    )
    with pytest.raises(
        CheckpointError, match=r"k_proj.weight' has shape \[16, 64\], expected \[32, 64\]"
    ):
        llmjax.from_hf(path)


def test_unknown_architecture_and_missing_directory(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfig, match="FalconForCausalLM"):
        llmjax.from_hf(path)
    with pytest.raises(CheckpointError, match="never downloads"):
        llmjax.from_hf(tmp_path / "nope")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    path = _saved(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfig, match="dynamic"):
        llmjax.from_hf(path)


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    hf = build_hf("qwen3").to(dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model, params = llmjax.from_hf(tmp_path)
    assert model.config.param_dtype == "bfloat16"
    assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(params))
    model32, params32 = llmjax.from_hf(tmp_path, param_dtype="float32")
    tokens = random_tokens(1, 10)
    ref = hf_logits(hf.float(), tokens)  # the bf16 weights, upcast: an exact fp32 reference
    assert np.abs(np.asarray(model32.apply(params32, tokens)) - ref).max() <= 1e-4


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_loading_streams_one_tensor_at_a_time(tmp_path, scan):
    """Host memory during from_hf stays near one parameter (a scanned model's: one stack of all
    layers' copies of a weight), not the checkpoint's size."""
    import tracemalloc

    vocab = 8192 if scan else 2048  # a stack is a third of the layers: a larger rest of the model
    model = llmjax.build(
        "llama3-tiny", d_model=256, n_layers=8, mlp_dim=1024, vocab_size=vocab, scan_layers=scan
    )
    llmjax.to_hf(model, model.init(jax.random.key(0)), tmp_path)
    total = (tmp_path / "model.safetensors").stat().st_size
    largest = max(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(model.abstract_params()))
    llmjax.from_hf(tmp_path, scan_layers=scan)  # first call: imports and jax's caches
    tracemalloc.start()
    loaded = llmjax.from_hf(tmp_path, scan_layers=scan)
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del loaded
    # jax on CPU adopts some host copies as the arrays' own buffers (those 64-byte aligned, which
    # depends on the allocator's state): memory of the result, not of the loading. What the
    # loader itself holds at its worst is the peak above what the result keeps.
    # A stack's transfer to the device may still read it while the next one fills: two at once.
    assert total > (5 if scan else 10) * largest  # the check below means something
    assert peak - held < (3 if scan else 4) * largest, f"peak {peak} (result holds {held})"


def test_loaded_params_do_not_alias_the_checkpoint_file(tmp_path):
    """Overwriting the safetensors file in place (as other writers do) leaves loaded params intact.

    The data section is 64-byte aligned here, the case where jax on CPU would adopt a view of the
    file's mapping as the array's buffer instead of copying it.
    """
    model = llmjax.build("llama3-tiny", d_model=256, n_layers=2, mlp_dim=1024, vocab_size=2048)
    llmjax.to_hf(model, model.init(jax.random.key(0)), tmp_path)
    file = tmp_path / "model.safetensors"
    src = SafetensorsFile(file)
    tensors = {n: np.array(src.get(n)) for n in src.names()}
    for pad in range(64):
        write(
            file,
            [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()],
            {"p": "x" * pad},
        )
        start = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        if start % 64 == 0:
            break
    assert start % 64 == 0
    _, params = llmjax.from_hf(tmp_path)
    before = [np.array(x) for x in jax.tree.leaves(params)]
    with open(file, "r+b") as f:  # in place: same inode, so a mapping of it would see the zeros
        f.seek(start)
        f.write(bytes(file.stat().st_size - start))
    after = [np.array(x) for x in jax.tree.leaves(params)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
