"""LoRA adapters as a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``).

``to_peft`` writes what ``peft.PeftModel.from_pretrained(hf_model, path)`` loads onto the
``transformers`` model that ``to_hf`` exports (or that ``from_hf`` read); ``from_peft`` reads such a
directory back. The module names and the flattening of multi-dim weights come from ``hf.py``'s
tensor table, so an adapter lands on the same matrix ``to_hf`` writes: for a weight stored as
``[out, in]``, PEFT's ``lora_A.weight`` is ``a`` flattened to ``[in, R]`` and transposed, and
``lora_B.weight`` is ``b`` flattened to ``[R, out]`` and transposed.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np

from llmjax.errors import ConfigError, HFCheckpointError
from llmjax.interop import safetensors
from llmjax.interop.hf import Tensor, _read_json, _write_text, tensor_table
from llmjax.interop.hf_config import config_to_hf
from llmjax.lora import LoraConfig, check_adapters, fold_paths, linear_params, nest
from llmjax.models.scan import stack_layers, unstack_layers

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# Fields whose non-default value changes what the adapter computes, which llmjax cannot express.
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def _modules(model) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(llmjax path -> its own HF linear module's entry, path -> fused entry holding several)."""
    arch = config_to_hf(model.config)["architectures"][0]
    own, fused = {}, {}
    for entry in tensor_table(model.config, arch):
        if entry.layout not in ("linear", "conv"):
            continue
        for p in entry.paths:
            (own if len(entry.paths) == 1 else fused)[p] = entry
    return own, fused


def _module_name(entry: Tensor) -> str:
    return entry.hf.removesuffix(".weight")


def _target_modules(chosen: list[str], own: dict[str, Tensor], fused: dict[str, Tensor]) -> list:
    """Short names (``q_proj``) when they pick exactly the chosen modules, else full names."""
    every = {_module_name(e) for e in [*own.values(), *fused.values()]}
    short = sorted({m.rsplit(".", 1)[-1] for m in chosen})
    if {m for m in every if m.rsplit(".", 1)[-1] in short} == set(chosen):
        return short
    return sorted(chosen)


def to_peft(model, adapters, cfg: LoraConfig, path, *, base_model_name_or_path: str = "") -> Path:
    """Write ``adapters`` (trained with ``cfg``) as a PEFT LoRA directory at ``path``.

    Everything is checked before the first byte is written: the model must be expressible as a
    Hugging Face architecture, the adapters must be exactly ``cfg``'s targets with fitting shapes,
    and each must have a module of its own (GPT-2's fused ``c_attn`` holds q, k and v at once).
    """
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"cfg is a {type(cfg).__name__}; pass the LoraConfig of the adapters")
    if model.config.scan_layers:  # PEFT names one module per layer: unstack at the boundary
        check_adapters(model, adapters, cfg)
        unrolled = type(model)(model.config.replace(scan_layers=False))
        adapters = unstack_layers(model.config, adapters)
        return to_peft(
            unrolled, adapters, cfg, path, base_model_name_or_path=base_model_name_or_path
        )
    pairs = check_adapters(model, adapters, cfg)
    own, fused = _modules(model)
    shared = [p for p in pairs if p in fused]
    if shared:
        module = _module_name(fused[shared[0]])
        allowed = [p for p in linear_params(model) if p in own]
        raise ConfigError(
            f"lora targets={cfg.targets!r} adapts {fold_paths(shared)}, which Hugging Face stores "
            f"fused in one module per layer ({module}); PEFT cannot hold an adapter per part, so "
            f"leave them out of targets (select among {fold_paths(allowed)})"
        )
    layouts = {own[p].layout for p in pairs}
    if len(layouts) > 1:
        raise ConfigError(
            f"lora targets={cfg.targets!r} mixes torch Linear and Conv1D modules, which one PEFT "
            "config cannot describe (fan_in_fan_out is global); target only one kind"
        )
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HFCheckpointError(
            f"{path} is an existing file; give a directory to write the adapter into (it is "
            "created if missing)"
        )
    tensors, rank = [], cfg.rank
    for p, (_, a, b) in pairs.items():
        module = _module_name(own[p])
        A = lambda a=a: np.asarray(jax.device_get(a), np.float32).reshape(-1, rank).T
        B = lambda b=b: np.asarray(jax.device_get(b), np.float32).reshape(rank, -1).T
        n_in, n_out = math.prod(a.shape[:-1]), math.prod(b.shape[1:])
        tensors.append((f"{_PREFIX}{module}.lora_A.weight", (rank, n_in), np.float32, A))
        tensors.append((f"{_PREFIX}{module}.lora_B.weight", (n_out, rank), np.float32, B))
    chosen = [_module_name(own[p]) for p in pairs]
    alpha = cfg.alpha
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "use_rslora": cfg.rslora,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "target_modules": _target_modules(chosen, own, fused),
        "fan_in_fan_out": layouts == {"conv"},
        "base_model_name_or_path": base_model_name_or_path or None,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    path.mkdir(parents=True, exist_ok=True)
    safetensors.write(path / WEIGHTS, tensors, {"format": "pt"})
    _write_text(path / CONFIG, json.dumps(config, indent=2))
    return path


def _targets_regex(paths: list[str], model) -> str:
    """A readable regex selecting exactly ``paths``: per-layer projections folded over layers."""
    layers = range(model.config.n_layers)
    suffixes = dict.fromkeys(
        m.group(1) for p in paths if (m := re.fullmatch(r"layers\.\d+\.(.+)", p))
    )
    every = [s for s in suffixes if all(f"layers.{i}.{s}" in paths for i in layers)]
    rest = [p for p in paths if not any(p == f"layers.{i}.{s}" for s in every for i in layers)]
    parts = [rf"layers\.\d+\.({'|'.join(re.escape(s) for s in every)})"] if every else []
    return "|".join(parts + [re.escape(p) for p in rest])


def _fail(path: Path, problem: str, fix: str) -> HFCheckpointError:
    return HFCheckpointError(f"{path}: {problem}; {fix}")


def _read_config(path: Path) -> dict:
    config = _read_json(path / CONFIG, "adapter config")
    if not isinstance(config, dict):
        raise _fail(path / CONFIG, "not a JSON object", "restore the adapter's original config")
    if config.get("peft_type") != "LORA":
        raise _fail(
            path / CONFIG,
            f"peft_type={config.get('peft_type')!r}",
            "only LoRA adapters (peft_type LORA) are read",
        )
    for key, default in _UNSUPPORTED.items():
        value = config.get(key, default)
        if value != default and (default or value):  # [] or {} for None: also unset
            raise _fail(
                path / CONFIG,
                f"{key}={value!r} is a PEFT feature llmjax's LoRA does not have",
                f"give an adapter saved with {key}={default!r}",
            )
    if not isinstance(config.get("use_rslora", False), bool):
        raise _fail(
            path / CONFIG, f"use_rslora={config['use_rslora']!r}", "it must be true or false"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise _fail(path / CONFIG, f"r={r!r}", "the rank must be a positive int")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise _fail(path / CONFIG, f"lora_alpha={alpha!r}", "lora_alpha must be a positive number")
    return config


def from_peft(path, model) -> tuple[dict, LoraConfig]:
    """``(adapters, cfg)`` from a PEFT LoRA directory made for ``model``'s architecture.

    Which weights are adapted is read from the tensors; ``cfg.targets`` is a regex selecting
    exactly them. ``lora_dropout`` is kept in the config (it acts in training only).
    """
    path = Path(path)
    if model.config.scan_layers:  # read per layer, then stack like the model's weights
        adapters, cfg = from_peft(path, type(model)(model.config.replace(scan_layers=False)))
        return stack_layers(model.config, adapters, partial=True), cfg
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise HFCheckpointError(
                f"{path}: no {name}; give a local PEFT adapter directory (as save_pretrained or "
                "to_peft writes it)"
            )
    config = _read_config(path)
    rank = config["r"]
    own, fused = _modules(model)
    by_module = {_module_name(e): p for p, e in own.items()}
    fused_modules = {_module_name(e) for e in fused.values()}
    linear = linear_params(model)
    f = safetensors.SafetensorsFile(path / WEIGHTS)
    found: dict[str, dict[str, str]] = {}
    unknown = []
    for name in f.names():
        m = _KEY.fullmatch(name)
        if m is not None and m["module"] in fused_modules:
            raise _fail(
                path / WEIGHTS,
                f"{name} adapts {m['module']}, which holds several llmjax weights fused",
                "give an adapter that leaves the fused module out",
            )
        if m is None or m["module"] not in by_module:
            unknown.append(name)
        else:
            found.setdefault(by_module[m["module"]], {})[m["part"]] = name
    if unknown or not found:
        names = f"the linear modules of {model.config.name!r}"
        problem = f"tensors {sorted(unknown)[:4]} are no LoRA weights of {names}"
        raise _fail(
            path / WEIGHTS,
            problem if unknown else "holds no LoRA weights",
            "give an adapter made for this model's architecture",
        )
    items = []
    paths = [p for p in linear if p in found]  # the model's order
    for p in paths:
        if set(found[p]) != {"A", "B"}:
            (name,), other = found[p].values(), "B" if "A" in found[p] else "A"
            raise _fail(path / WEIGHTS, f"{name} has no lora_{other}", "save both halves")
        keys, shape, n_in = linear[p]
        n = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
        A, B = f.get(found[p]["A"]), f.get(found[p]["B"])
        if A.shape != (rank, n[0]) or B.shape != (n[1], rank):
            raise _fail(
                path / WEIGHTS,
                f"{found[p]['A']} is {list(A.shape)} and lora_B {list(B.shape)}, expected "
                f"{[rank, n[0]]} and {[n[1], rank]} for r={rank}",
                "give an adapter made for this model's sizes",
            )
        for name in found[p].values():
            if f.dtype(name) not in safetensors.FLOATS:
                raise _fail(path / WEIGHTS, f"{name} is {f.dtype(name)}", "save float weights")
        a = A.astype(np.float32).T.reshape(*shape[:n_in], rank)
        b = B.astype(np.float32).T.reshape(rank, *shape[n_in:])
        items.append((keys, {"a": jax.numpy.asarray(a), "b": jax.numpy.asarray(b)}))
    cfg = LoraConfig(
        rank=rank,
        alpha=float(config["lora_alpha"]),
        targets=_targets_regex(paths, model),
        rslora=bool(config.get("use_rslora", False)),
        dropout=float(config.get("lora_dropout") or 0.0),
    )
    return nest(items), cfg


__all__ = ["from_peft", "to_peft"]
