"""Broken Hugging Face directories and bad exports: rows of the bad-input table.

Each row breaks a private copy of the shared export (``env.hf``) in one way; ``llmjax generate
--hf`` must then exit 2 with one line naming the file and the problem, and ``from_hf``/``to_hf``
must raise ``HFCheckpointError``. Exports that fail must not write or change anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import llmjax
from llmjax.errors import HFCheckpointError
from llmjax.interop.hf_config import UnsupportedConfig, config_from_hf
from llmjax.interop.safetensors import SafetensorsFile, write
from tests.bad_inputs import Api, Cli, Env

NORM = "model.norm.weight"
K, V = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"


def _generate(path) -> list[str]:
    return ["generate", "--hf", str(path), "--prompt-ids", "2,5,9", "--max-new-tokens", "2"]


def _rel(path) -> str:
    """``path`` relative to the working directory: what a user types."""
    return os.path.relpath(path)


def _config(env: Env, edit) -> Path:
    d = env.copy(env.hf, "hf")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _header(env: Env, edit) -> Path:
    """A copy whose safetensors header is ``edit(header)``, with the data bytes as they were."""
    d = env.copy(env.hf, "hf")
    f = d / "model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header = edit(header) or header
    blob = json.dumps(header).encode()
    f.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    return d


def _raw(env: Env, edit) -> Path:
    d = env.copy(env.hf, "hf")
    f = d / "model.safetensors"
    f.write_bytes(edit(f.read_bytes()))
    return d


def _retyped(env: Env, name: str, dtype) -> Path:
    """A copy where tensor ``name`` is stored as ``dtype`` (a well-formed file)."""
    d = env.copy(env.hf, "hf")
    f = SafetensorsFile(d / "model.safetensors")
    tensors = {n: np.array(f.get(n)) for n in f.names()}
    del f
    tensors[name] = tensors[name].astype(dtype)
    write(
        d / "model.safetensors", [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()]
    )
    return d


def _set(entry: str, **fields):
    def edit(header):
        header[entry].update(fields)

    return edit


def _sharded_with_a_missing_shard(env: Env) -> Path:
    d = env.copy(env.hf, "hf")
    names = list(SafetensorsFile(d / "model.safetensors").names())
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return d


def _with_file(env: Env, name: str, content: str | None) -> Path:
    """A copy with file ``name`` replaced by ``content`` (removed when None)."""
    d = env.copy(env.hf, "hf")
    if content is None:
        (d / name).unlink()
    else:
        (d / name).write_text(content)
    return d


def _copy_params(params: dict) -> dict:
    return {k: _copy_params(v) if isinstance(v, dict) else v for k, v in params.items()}


def _without(params: dict, *path) -> dict:
    out = _copy_params(params)
    node = out
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return out


def _with(params: dict, value, *path) -> dict:
    out = _copy_params(params)
    node = out
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return out


def _nothing_at(name: str):
    def check(env: Env) -> None:
        assert not (env.tmp / name).exists(), sorted(os.listdir(env.tmp / name))

    return check


def _same_as_export(env: Env) -> None:
    """The private copy of the export still holds exactly the shared export's bytes."""
    copy = env.tmp / "hf"
    assert sorted(os.listdir(copy)) == sorted(os.listdir(env.hf))
    for name in os.listdir(env.hf):
        assert (copy / name).read_bytes() == (env.hf / name).read_bytes(), name


def _file_unchanged(env: Env) -> None:
    assert (env.tmp / "target").read_text() == "keep me"


CASES = [
    Cli(
        "hf: config.json is not JSON",
        lambda e: _generate(_with_file(e, "config.json", '{"vocab_size": 512,')),
        "config.json is not valid JSON",
    ),
    Cli(
        "hf: config.json without hidden_size",
        lambda e: _generate(_config(e, lambda c: c.pop("hidden_size"))),
        "config.json: the required field 'hidden_size' is missing; add the model's value",
    ),
    Cli(
        "hf: config.json with a string for num_hidden_layers",
        lambda e: _generate(_config(e, lambda c: c.update(num_hidden_layers="2"))),
        "the field 'num_hidden_layers' is '2', not a positive integer",
    ),
    Cli(
        "hf: config.json that is a list",
        lambda e: _generate(_with_file(e, "config.json", "[1, 2]")),
        "config.json holds a JSON list, not an object",
    ),
    Cli(
        "hf: config.json for other weights",
        lambda e: _generate(_config(e, lambda c: c.update(intermediate_size=96))),
        "has shape [128, 64], expected [96, 64] from config.json",
    ),
    Cli(
        "hf: truncated safetensors, relative path",
        lambda e: _generate(_rel(_raw(e, lambda b: b[: len(b) // 2]))),
        "model.safetensors: truncated: tensor '",
    ),
    Cli(
        "hf: absurd header length",
        lambda e: _generate(_raw(e, lambda b: (10**12).to_bytes(8, "little") + b[8:])),
        "the header claims 1,000,000,000,000 bytes but the file has",
    ),
    Cli(
        "hf: file shorter than a header",
        lambda e: _generate(_raw(e, lambda b: b[:5])),
        "5 bytes, too short for a safetensors header",
    ),
    Cli(
        "hf: header that is not JSON",
        lambda e: _generate(_raw(e, lambda b: b[:8] + b"\xff" * 16 + b[24:])),
        "its header is not JSON",
    ),
    Cli(
        "hf: header that is a list",
        lambda e: _generate(_header(e, lambda h: [h])),
        "its header is a JSON list, not an object",
    ),
    Cli(
        "hf: negative data_offsets",
        lambda e: _generate(_header(e, _set(NORM, data_offsets=[-4, 252]))),
        f"tensor '{NORM}' has data_offsets [-4, 252]",
    ),
    Cli(
        "hf: data_offsets beyond the file",
        lambda e: _generate(_header(e, _set(NORM, data_offsets=[10**9, 10**9 + 256]))),
        f"truncated: tensor '{NORM}' needs 1,000,000,256 data bytes but the file holds",
    ),
    Cli(
        "hf: data_offsets that disagree with the shape",
        lambda e: _generate(_header(e, _set(NORM, shape=[32]))),
        f"tensor '{NORM}' (F32 [32]) needs 128 bytes but its data_offsets span 256",
    ),
    Cli(
        "hf: overlapping tensors",
        lambda e: _generate(_header(e, lambda h: h[V].update(data_offsets=h[K]["data_offsets"]))),
        "share bytes",
    ),
    Cli(
        "hf: unsupported dtype",
        lambda e: _generate(_header(e, _set(NORM, dtype="C64"))),
        f"tensor '{NORM}' has dtype C64, which llmjax does not read",
    ),
    Cli(
        "hf: integer weights",
        lambda e: _generate(_retyped(e, NORM, np.int32)),
        f"tensor '{NORM}' is stored as I32, but it is a float weight",
    ),
    Cli(
        "hf: index naming a missing shard",
        lambda e: _generate(_sharded_with_a_missing_shard(e)),
        "names 1 file(s) missing from",
    ),
    Cli(
        "hf: index that is not JSON",
        lambda e: _generate(_with_file(e, "model.safetensors.index.json", "weight_map")),
        "model.safetensors.index.json is not valid JSON",
    ),
    Cli(
        "hf: no weights",
        lambda e: _generate(_with_file(e, "model.safetensors", None)),
        "no model.safetensors or model.safetensors.index.json",
    ),
    Cli(
        "hf: directory that does not exist, relative path",
        lambda e: _generate(_rel(e.tmp / "no-such-model")),
        "no-such-model",
    ),
    Cli(
        "hf: a file instead of a directory",
        lambda e: _generate(e.hf / "config.json"),
        "config.json is a file, not a directory",
    ),
    Cli(
        "export: --out is a file",
        lambda e: ["export", "--ckpt", str(e.run), "--out", e.write("target", "keep me")],
        "target is an existing file; give a directory",
        _file_unchanged,
    ),
    Api(
        "hf api: directory that does not exist, relative path",
        lambda e: llmjax.from_hf(_rel(e.tmp / "no-such-model")),
        HFCheckpointError,
        "no-such-model does not exist; give a local Hugging Face model directory",
    ),
    Api(
        "hf api: a file instead of a directory",
        lambda e: llmjax.from_hf(e.hf / "model.safetensors"),
        HFCheckpointError,
        "model.safetensors is a file, not a directory",
    ),
    Api(
        "hf api: config.json without vocab_size",
        lambda e: llmjax.from_hf(_config(e, lambda c: c.pop("vocab_size"))),
        HFCheckpointError,
        "the required field 'vocab_size' is missing",
    ),
    Api(
        "hf api: boolean weights",
        lambda e: llmjax.from_hf(_retyped(e, NORM, np.bool_)),
        HFCheckpointError,
        "is stored as BOOL, but it is a float weight",
    ),
    Api(
        "hf api: unknown architecture",
        lambda e: llmjax.from_hf(
            _config(e, lambda c: c.update(architectures=["FalconForCausalLM"]))
        ),
        UnsupportedConfig,
        "unsupported architecture ['FalconForCausalLM']",
    ),
    Api(
        "hf api: config dict without num_hidden_layers",
        lambda e: config_from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}),
        HFCheckpointError,
        "the required field 'num_hidden_layers' is missing",
    ),
    Api(
        "hf api: empty safetensors file",
        lambda e: SafetensorsFile(e.write("empty.safetensors", b"")),
        HFCheckpointError,
        "empty.safetensors: 0 bytes, too short",
    ),
    Api(
        "to_hf api: target is a file",
        lambda e: llmjax.to_hf(e.model, e.params, e.write("target", "keep me")),
        HFCheckpointError,
        "is an existing file",
        _file_unchanged,
    ),
    Api(
        "to_hf api: a missing parameter writes nothing",
        lambda e: llmjax.to_hf(e.model, _without(e.params, "blocks", 0, "mlp", "up"), e.tmp / "o"),
        HFCheckpointError,
        "params do not match the config of llama3-tiny (missing blocks.0.mlp.up)",
        _nothing_at("o"),
    ),
    Api(
        "to_hf api: an extra parameter writes nothing",
        lambda e: llmjax.to_hf(e.model, _with(e.params, np.zeros(3), "extra"), e.tmp / "o"),
        HFCheckpointError,
        "(unexpected extra)",
        _nothing_at("o"),
    ),
    Api(
        "to_hf api: a mis-shaped last parameter leaves an export intact",
        lambda e: llmjax.to_hf(
            e.model,
            _with(e.params, np.zeros((2, 64, 128)), "blocks", 0, "mlp", "down"),
            e.copy(e.hf, "hf"),
        ),
        HFCheckpointError,
        "mis-shaped blocks.0.mlp.down [2, 64, 128] (expected [2, 128, 64])",
        _same_as_export,
    ),
    Api(
        "to_hf api: params that are not a dict",
        lambda e: llmjax.to_hf(e.model, list(e.params.values()), e.tmp / "o"),
        HFCheckpointError,
        "params is a list",
        _nothing_at("o"),
    ),
]
