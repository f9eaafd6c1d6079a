"""Load and save Hugging Face checkpoints (config.json + safetensors) for the supported families.

Each architecture is a table of ``Tensor`` entries (``hf_tensors``): one Hugging Face tensor and the
llmjax parameter(s) it holds. Loading streams one tensor at a time from memory-mapped files, so an 8B checkpoint never needs
twice its size in host memory; every missing, unexpected or mis-shaped tensor is reported by name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np

from llmjax.config import ModelConfig, dtype_of
from llmjax.errors import HFCheckpointError, LlmjaxError
from llmjax.interop import safetensors
from llmjax.interop.hf_config import architecture_of, config_from_hf, config_to_hf
from llmjax.interop.hf_tensors import (  # noqa: F401  (Tensor and the layouts are re-exported)
    Tensor,
    _is_ignorable,
    hf_shape,
    tensor_table,
    to_hf_tensor,
    to_llmjax,
)
from llmjax.models.model import Model
from llmjax.models.scan import scan_plan, unstack_layers

CheckpointError = HFCheckpointError  # the name this module has always raised


# Reading -------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise HFCheckpointError(
            f"cannot read {path} ({e.strerror or e}); check that it is a readable file"
        ) from e
    except ValueError as e:  # not JSON, or not UTF-8
        raise HFCheckpointError(
            f"{path} is not valid JSON ({e}); restore the {what} from the original checkpoint"
        ) from e


class _Checkpoint:
    """The safetensors files of one model directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            data = _read_json(index, "index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(
                isinstance(f, str) for f in weight_map.values()
            ):
                raise HFCheckpointError(
                    f"{index} has no weight_map from tensor names to file names; restore the "
                    "index from the original checkpoint"
                )
            names = sorted(set(weight_map.values()))
            absent = [f for f in names if not (path / f).is_file()]
            if absent:
                raise HFCheckpointError(
                    f"{index} names {len(absent)} file(s) missing from {path} "
                    f"({', '.join(absent[:4])}{', ...' if len(absent) > 4 else ''}); download "
                    "or copy every shard"
                )
            files = {f: safetensors.SafetensorsFile(path / f) for f in names}
            for name, f in weight_map.items():
                if name not in files[f].entries:
                    raise HFCheckpointError(
                        f"{index} puts tensor {name!r} in {f}, which does not hold it; the "
                        "index and the shards come from different checkpoints"
                    )
            self.where = {name: files[f] for name, f in weight_map.items()}
        elif (path / "model.safetensors").exists():
            single = safetensors.SafetensorsFile(path / "model.safetensors")
            self.where = {name: single for name in single.names()}
        else:
            raise HFCheckpointError(
                f"{path}: no model.safetensors or model.safetensors.index.json (PyTorch .bin "
                "checkpoints are not read; convert them with transformers' save_pretrained)"
            )

    def names(self):
        return set(self.where)


def _unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = value
    return tree


def _flatten(tree, prefix="") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def read_config(path: Path) -> dict:
    """The ``config.json`` of a local Hugging Face model directory, as a dict."""
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise HFCheckpointError(
            f"{path} {what}; give a local Hugging Face model directory holding config.json "
            "and safetensors (llmjax never downloads)"
        )
    if not (path / "config.json").is_file():
        raise HFCheckpointError(
            f"{path}: no config.json; `path` must be a local Hugging Face model "
            "directory (llmjax never downloads)"
        )
    hf = _read_json(path / "config.json", "config")
    if not isinstance(hf, dict):
        raise HFCheckpointError(
            f"{path / 'config.json'} holds a JSON {type(hf).__name__}, not an object; restore "
            "the config from the original checkpoint"
        )
    return hf


def configure(
    path: Path, hf: dict, *, param_dtype: str | None, dtype: str | None, **config_overrides
) -> tuple[str, ModelConfig]:
    """``(architecture, config)`` of a Hugging Face config; dtypes default to the stored one."""
    stored = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    param_dtype = param_dtype or (
        stored if stored in ("float32", "bfloat16", "float16") else "float32"
    )
    try:
        arch = architecture_of(hf)
        cfg = config_from_hf(
            hf, param_dtype=param_dtype, dtype=dtype or param_dtype, **config_overrides
        )
    except LlmjaxError as e:
        # The same error, naming the file: "config.json" alone is ambiguous among directories.
        raise type(e)(f"{path / 'config.json'}: {e}") from e
    return arch, cfg


def _placement(cfg: ModelConfig):
    """Where a per-layer path lands in ``cfg``'s layout: ``(path, repeat)``, repeat None unless
    the layer is scanned (then its tensor is row ``repeat`` of the block's stack)."""
    plan = scan_plan(cfg)

    def place(p: str) -> tuple[str, int | None]:
        parts = p.split(".")
        if parts[0] == "layers" and plan.repeats and plan.scanned(int(parts[1])):
            r, j = plan.position(int(parts[1]))
            return ".".join(["blocks", str(j), *parts[2:]]), r
        return p, None

    return place


def load_tensors(
    path: Path,
    cfg: ModelConfig,
    arch: str,
    shapes: dict[str, tuple[int, ...]],
    *,
    shardings=None,
    head: list[Tensor] | None = None,
    name: str | None = None,
) -> dict[str, object]:
    """The flat llmjax parameters held by the checkpoint in ``path``, in ``cfg``'s layout.

    ``shapes`` are the per-layer shapes (``layer_shapes``); with ``cfg.scan_layers`` the layers a
    scan runs are stacked as they load. ``head`` entries replace ``lm_head.weight`` (a classifier's ``score.weight``);
    ``name`` is the architecture the messages call the checkpoint (default ``arch``).
    """
    ckpt = _Checkpoint(path)
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    prefix = "transformer." if any(n.startswith("transformer.") for n in ckpt.names()) else ""
    fused = any(n.endswith(".experts.gate_up_proj") for n in ckpt.names())
    table = tensor_table(cfg, arch, prefix, fused_experts=fused)
    if head is not None:
        table = [e for e in table if e.hf != "lm_head.weight"] + list(head)
    missing = [e.hf for e in table if e.hf not in ckpt.where]
    expected = {e.hf for e in table}
    unexpected = sorted(n for n in ckpt.names() - expected if not _is_ignorable(n, cfg))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its {name or arch} config: missing tensors "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}; unexpected tensors "
            f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; use the config.json saved "
            "with these weights"
        )
    pdt = dtype_of(cfg.param_dtype)
    where = _placement(cfg)
    repeats = scan_plan(cfg).repeats

    # The table's order, except that the pieces of one stack (or expert array) come together so
    # that it completes before the next starts.
    first: dict[str, int] = {}
    for i, entry in enumerate(table):
        first.setdefault(where(entry.paths[0])[0], i)

    def order(entry):
        dest, r = where(entry.paths[0])
        return first[dest], -1 if r is None else r, -1 if entry.expert is None else entry.expert

    # A parameter filled piece by piece (a stack's repeats, an [E, ...]'s experts) waits on the
    # host until its last piece arrives, then goes to its device: host memory holds one of them.
    flat, filling, left = {}, {}, {}
    for entry in sorted(table, key=order):
        f = ckpt.where[entry.hf]
        parts = [entry.part_shape(shapes[p]) for p in entry.paths]
        want = hf_shape(entry, parts)
        if f.shape(entry.hf) != want:
            raise CheckpointError(
                f"tensor {entry.hf!r} has shape {list(f.shape(entry.hf))}, expected "
                f"{list(want)} from config.json; use the config.json saved with {f.path.name}"
            )
        kind = f.dtype(entry.hf)
        if kind in safetensors.DTYPES and kind not in safetensors.FLOATS:
            # Casting integers to float would load without error and compute wrong logits.
            raise HFCheckpointError(
                f"{f.path}: tensor {entry.hf!r} is stored as {kind}, but it is a "
                "float weight; export the checkpoint in float32, bfloat16 or float16"
            )
        raw = f.get(entry.hf)
        arrays = to_llmjax(entry, raw, parts)
        for p, a in zip(entry.paths, arrays, strict=True):
            dest, r = where(p)
            index = tuple(i for i in (r, entry.expert) if i is not None)
            if not index:
                a = a.astype(pdt, copy=False)
                if np.may_share_memory(a, raw):
                    # jax on CPU adopts an aligned host buffer instead of copying it; a view of
                    # the file's mapping would tie the params to the file (an in-place rewrite
                    # changes them).
                    a = a.copy()
                flat[dest] = jax.device_put(a, flat_shardings.get(dest))
                continue
            if dest not in filling:
                shape = ((repeats,) if r is not None else ()) + tuple(shapes[p])
                filling[dest] = np.empty(shape, pdt)
                left[dest] = int(np.prod(shape[: len(index)]))
            filling[dest][index] = a  # copies: never a view of the file
            left[dest] -= 1
            if not left[dest]:
                a = filling.pop(dest)
                flat[dest] = jax.device_put(a, flat_shardings.get(dest))
    return flat


def from_hf(
    path,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    shardings=None,
    **config_overrides,
) -> tuple[Model, dict]:
    """``(model, params)`` from a local Hugging Face directory; nothing is downloaded.

    ``param_dtype`` defaults to the checkpoint's dtype and ``dtype`` (compute) to ``param_dtype``.
    ``shardings`` (a tree like the params of ``jax.sharding.Sharding``) places each tensor as it loads.
    """
    path = Path(path)
    hf = read_config(path)
    arch, cfg = configure(path, hf, param_dtype=param_dtype, dtype=dtype, **config_overrides)
    model = Model(cfg)
    flat = load_tensors(path, cfg, arch, layer_shapes(model), shardings=shardings)
    return model, _unflatten(flat)


def layer_shapes(model: Model) -> dict[str, tuple[int, ...]]:
    """The flat parameter shapes with one entry per layer, as checkpoints store them (a scanned
    model's stacks are converted after loading and before writing, ``llmjax.models.scan``)."""
    if model.config.scan_layers:
        model = Model(model.config.replace(scan_layers=False))
    return {k: v.shape for k, v in _flatten(model.abstract_params()).items()}


def per_layer(model: Model, flat: dict) -> dict:
    """The checked flat params of ``model`` with one entry per layer (unstacked if scanned)."""
    if not model.config.scan_layers:
        return flat
    return _flatten(unstack_layers(model.config, _unflatten(flat)))


# Writing -------------------------------------------------------------------------------------------
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def check_params(model: Model, params, drop: tuple[str, ...] = ()) -> dict[str, object]:
    """The flat params, after checking every leaf against the model's config (nothing written yet).

    Top-level entries named in ``drop`` may be present or absent and are left out.
    """
    if not isinstance(params, dict):
        raise HFCheckpointError(
            f"params is a {type(params).__name__}; pass the nested dict of arrays that "
            "model.init or from_hf returns"
        )
    flat = _flatten({k: v for k, v in params.items() if k not in drop})
    abstract = {k: v for k, v in model.abstract_params().items() if k not in drop}
    want = {k: tuple(v.shape) for k, v in _flatten(abstract).items()}
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    wrong = [
        f"{k} {list(getattr(flat[k], 'shape', ()))} (expected {list(want[k])})"
        for k in want
        if k in flat and tuple(getattr(flat[k], "shape", ())) != want[k]
    ]
    problems = [
        f"{label} {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
        for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", wrong))
        if names
    ]
    if problems:
        raise HFCheckpointError(
            f"params do not match the config of {model.config.name} ({'; '.join(problems)}); "
            "pass the params of this model, as model.init or a checkpoint of the same config "
            "gives them"
        )
    return flat


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_hf(
    model: Model, params, path, *, architecture: str | None = None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write ``config.json`` and safetensors (sharded above ``max_shard_bytes``) to ``path``.

    Everything is checked before the first byte is written: the config must be expressible as the
    architecture and every parameter must have the shape the config gives it. Weight files of an
    earlier export into the same directory that this one does not replace are removed, so
    ``from_hf`` never reads a stale index or shard.
    """
    cfg = model.config
    hf = config_to_hf(cfg, architecture)
    path = Path(path)
    check_target(path)
    flat = per_layer(model, check_params(model, params))
    table = tensor_table(cfg, hf["architectures"][0])
    return write_checkpoint(path, cfg, hf, table, flat, max_shard_bytes)


def check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise HFCheckpointError(
            f"{path} is an existing file; give a directory to write the checkpoint into "
            "(it is created if missing)"
        )


def write_checkpoint(
    path: Path, cfg: ModelConfig, hf: dict, table: list[Tensor], flat: dict, max_shard_bytes: int
) -> Path:
    """Write the ``table``'s tensors from the flat arrays ``flat``, then ``hf`` as config.json."""
    pdt = np.dtype(dtype_of(cfg.param_dtype))

    def part(entry, p):
        return flat[p] if entry.expert is None else flat[p][entry.expert]

    def producer(entry):
        return lambda: to_hf_tensor(
            entry, [np.asarray(jax.device_get(part(entry, p))) for p in entry.paths]
        )

    entries = [
        (e.hf, hf_shape(e, [e.part_shape(flat[p].shape) for p in e.paths]), pdt, producer(e))
        for e in table
    ]
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * pdt.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        written = {"model.safetensors"}
        safetensors.write(path / "model.safetensors", shards[0], meta)
    else:
        weight_map, total, written = {}, 0, {"model.safetensors.index.json"}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors.write(path / fname, shard, meta)
            written.add(fname)
            for name, shape, _, _ in shard:
                weight_map[name] = fname
                total += int(np.prod(shape)) * pdt.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    for old in path.iterdir():
        stale = old.name in ("model.safetensors", "model.safetensors.index.json")
        if (stale or _SHARD.fullmatch(old.name)) and old.name not in written:
            old.unlink()
    _write_text(path / "config.json", json.dumps(hf, indent=2))
    return path
