"""Damaged Hugging Face files fail with ``HFCheckpointError`` naming the file; exports write all or
nothing. (The bad-input table covers one row per kind; these check the details a row cannot.)"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import llmjax
from llmjax.errors import HFCheckpointError, LlmjaxError
from llmjax.interop.hf import CheckpointError
from llmjax.interop.hf_config import UnsupportedConfig
from llmjax.interop.safetensors import SafetensorsFile, write


@pytest.fixture(scope="module")
def tiny():
    model = llmjax.build("llama3-tiny")
    return model, model.init(jax.random.key(0))


@pytest.fixture
def exported(tiny, tmp_path):
    model, params = tiny
    return llmjax.to_hf(model, params, tmp_path / "hf")


def _tensors(path):
    f = SafetensorsFile(path)
    return {n: np.array(f.get(n)) for n in f.names()}


def _write(path, tensors):
    write(path, [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])


def test_error_types():
    assert CheckpointError is HFCheckpointError
    assert issubclass(HFCheckpointError, LlmjaxError) and issubclass(HFCheckpointError, ValueError)
    assert issubclass(UnsupportedConfig, LlmjaxError) and issubclass(UnsupportedConfig, ValueError)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_])
def test_integer_weights_are_refused_not_cast(exported, dtype):
    """Cast to float, integer norm scales load without error and move every logit."""
    file = exported / "model.safetensors"
    tensors = _tensors(file)
    tensors["model.norm.weight"] = (tensors["model.norm.weight"] + 0.6).astype(dtype)
    _write(file, tensors)
    with pytest.raises(
        HFCheckpointError, match=r"model.safetensors: tensor 'model.norm.weight' is"
    ):
        llmjax.from_hf(exported)


def test_truncation_names_the_tensor_and_both_sizes(exported):
    file = exported / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    last = max(entries, key=lambda k: entries[k]["data_offsets"][1])
    end = entries[last]["data_offsets"][1]
    file.write_bytes(raw[:-100])
    with pytest.raises(HFCheckpointError) as info:
        llmjax.from_hf(exported)
    assert (
        f"{file}: truncated: tensor '{last}' needs {end:,} data bytes but the file holds "
        f"{end - 100:,}"
    ) in str(info.value)


def test_a_header_larger_than_the_file_is_refused_without_reading_it(exported):
    file = exported / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes((2**62).to_bytes(8, "little") + raw[8:])
    with pytest.raises(HFCheckpointError, match="the header claims 4,611,686,018,427,387,904"):
        SafetensorsFile(file)


def test_overlaps_are_found_whatever_the_order(exported):
    file = exported / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    spans = sorted((e["data_offsets"], k) for k, e in header.items() if k != "__metadata__")
    # The first tensor grows over the second and third; the second keeps its own bytes.
    (b0, _), first = spans[0]
    (_, e2), _ = spans[2]
    header[first] = {"dtype": "U8", "shape": [e2 - b0], "data_offsets": [b0, e2]}
    blob = json.dumps(header).encode()
    file.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    with pytest.raises(HFCheckpointError, match=f"tensors '{first}' and '.*' share bytes"):
        SafetensorsFile(file)


def test_a_shard_missing_from_its_index_is_named(tiny, tmp_path):
    model, params = tiny
    out = llmjax.to_hf(model, params, tmp_path / "hf", max_shard_bytes=100_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    with pytest.raises(HFCheckpointError, match=f"names 1 file.s. missing .*{shards[1].name}"):
        llmjax.from_hf(out)


def test_an_index_that_places_a_tensor_in_the_wrong_shard(tiny, tmp_path):
    model, params = tiny
    out = llmjax.to_hf(model, params, tmp_path / "hf", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = min(index["weight_map"].values())
    name = next(n for n, f in index["weight_map"].items() if f != first)
    index["weight_map"][name] = first
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=f"puts tensor '{name}' in {first}, which does not"):
        llmjax.from_hf(out)


def test_config_errors_name_the_file(exported):
    cfg = json.loads((exported / "config.json").read_text())
    for field in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        broken = {k: v for k, v in cfg.items() if k != field}
        (exported / "config.json").write_text(json.dumps(broken))
        with pytest.raises(HFCheckpointError) as info:
            llmjax.from_hf(exported)
        assert str(info.value).startswith(
            f"{exported / 'config.json'}: the required field '{field}' is missing"
        )


def test_to_hf_checks_every_shape_before_writing(tiny, tmp_path):
    model, params = tiny
    out = tmp_path / "hf"
    # The last leaf written is wrong: a writer that checked as it went would leave files behind.
    bad = jax.tree.map(lambda x: x, params)
    bad["lm_head"] = np.zeros((3, 3), np.float32)
    with pytest.raises(HFCheckpointError, match=r"mis-shaped lm_head \[3, 3\] \(expected"):
        llmjax.to_hf(model, bad, out, max_shard_bytes=100_000)
    assert not out.exists()


def test_a_new_export_replaces_an_earlier_one_in_the_same_directory(tiny, tmp_path):
    """A sharded export then a single-file one: the stale index must not win when loading."""
    model, params = tiny
    out = tmp_path / "hf"
    llmjax.to_hf(model, params, out, max_shard_bytes=100_000)
    other = jax.tree.map(lambda x: x * 2, params)
    llmjax.to_hf(model, other, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _, loaded = llmjax.from_hf(out)
    assert np.array_equal(np.asarray(loaded["lm_head"]), np.asarray(other["lm_head"]))
