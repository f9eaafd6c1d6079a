"""The complete, frozen description of a training run: model + data + optimizer + loop.

A recipe is a Python function returning one ``TrainConfig``; the command line changes it only
through ``override(config, "section.field=value")``, which type-checks the value against the field
and suggests the closest keys on a typo.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
from dataclasses import dataclass, field

from llmjax.config import ConfigError, ModelConfig, model_config_from_dict  # noqa: F401
from llmjax.data.pipeline import DataConfig
from llmjax.errors import UnknownName
from llmjax.losses.chunked import DEFAULT_CHUNK

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, then cosine or linear decay to ``min_lr_ratio * lr``."""

    lr: float = 3e-3
    warmup_steps: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (parameters with >= 2 dims)
    clip_norm: float = 1.0  # global gradient norm; 0 disables clipping

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")


@dataclass(frozen=True)
class LoopConfig:
    """What the loop does around the step: length, accumulation, evaluation, saving, logging."""

    steps: int = 300
    grad_accum: int = 1  # micro-batches per step; data.batch_size is the whole step's batch
    z_loss: float = 0.0  # weight of log(Z)^2, which keeps the softmax normaliser near 1
    # Tokens per device the next-token loss projects to the vocabulary at a time (chunked
    # cross-entropy: float32 [B, T, V] logits never exist); 0: the full logits.
    ce_chunk: int = DEFAULT_CHUNK
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 3
    keep_best: bool = True  # also keep the checkpoint with the lowest eval loss
    async_save: bool = True
    mesh: str = ""  # "data=2,fsdp=-1"; empty: every device on the data axis
    rules: str = ""  # parallelism preset (dp, fsdp, tp, fsdp_tp, ep, ep_tp); empty: from the mesh
    sample_tokens: int = 64  # length of the sample printed at the end; 0 disables
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name}={getattr(self, name)}: must be >= 1")
        for name in ("eval_every", "save_every", "sample_tokens", "ce_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loop.{name}={getattr(self, name)}: must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    name: str = "custom"

    def __post_init__(self):
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} is beyond the model's max_seq_len="
                f"{self.model.max_seq_len} ({self.model.name}); lower it or set model.max_seq_len"
            )
        if self.data.batch_size % self.loop.grad_accum:
            raise ConfigError(
                f"data.batch_size={self.data.batch_size} is not divisible by "
                f"loop.grad_accum={self.loop.grad_accum}"
            )


# --- overrides ----------------------------------------------------------------------------------


def valid_keys(obj, prefix: str = "") -> list[str]:
    """Every dotted key ``override`` accepts for ``obj``."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _parse(text: str, current, key: str):
    """``text`` as a value of the same kind as ``current`` (the field's present value)."""
    if isinstance(current, bool):
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if isinstance(current, str):
        return text
    if isinstance(current, tuple):
        if text == "":
            return ()
        return tuple(_parse(p, current[0] if current else "", key) for p in text.split(","))
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ConfigError(f"{key}={text!r}: expected {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"{key}={text!r}: expected {type(current).__name__}")
    return value


def _set(obj, path: list[str], text: str, full_key: str):
    names = {f.name for f in dataclasses.fields(obj)}
    head = path[0]
    if head not in names:
        raise KeyError(head)
    current = getattr(obj, head)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise KeyError(head)
        value = _set(current, path[1:], text, full_key)
    else:
        if dataclasses.is_dataclass(current):
            raise KeyError(head)
        value = _parse(text, current, full_key)
    if isinstance(obj, ModelConfig):  # its replace() validates and names valid fields
        return obj.replace(**{head: value})
    return dataclasses.replace(obj, **{head: value})


# Names other trainers use for a field llmjax names differently (Hugging Face, nanoGPT, optax).
_SYNONYMS = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_steps": "steps",
    "train_steps": "steps",
    "total_steps": "steps",
    "warmup": "warmup_steps",
    "max_grad_norm": "clip_norm",
    "grad_clip": "clip_norm",
    "gradient_accumulation_steps": "grad_accum",
    "block_size": "seq_len",
    "context_length": "seq_len",
    "num_layers": "n_layers",
    "n_layer": "n_layers",
    "num_heads": "n_heads",
    "n_head": "n_heads",
}


def closest_keys(key: str, keys: list[str], n: int = 3) -> list[str]:
    """The valid keys nearest to a mistyped ``key``, best first.

    A key whose last component names a field exactly (or by another trainer's name for it) has
    only its section missing or wrong (``lr``, ``steps``, ``optim.learning_rate``): those fields
    are the answer. Otherwise whole dotted keys and last components are compared by similarity.
    """
    last = key.rsplit(".", 1)[-1]
    last = _SYNONYMS.get(last, last)
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    section = key.rsplit(".", 1)[0] if "." in key else None
    # The typed section first: ``tokenizer.vocab_size`` is data.tokenizer_config's, not the model's.
    exact = sorted(leaves.get(last, []), key=lambda k: not (section and section in k))
    if exact:  # the field exists, only its section is missing or wrong
        return exact[:n]
    found = difflib.get_close_matches(key, keys, n=n, cutoff=0.6)
    for name in difflib.get_close_matches(last, list(leaves), n=n, cutoff=0.75):
        found += leaves[name]
    if not found and len(last) > 2:  # the start of a longer name: ``warm`` -> ``warmup_steps``
        found = [k for k in keys if k.rsplit(".", 1)[-1].startswith(last)]
    return list(dict.fromkeys(found))[:n]


def override(config: TrainConfig, assignment: str) -> TrainConfig:
    """Apply one ``section.field=value``; an unknown key raises ``ConfigError`` naming the nearest."""
    keys = valid_keys(config)
    if "=" not in assignment:
        key = assignment.strip()
        fix = f"{key}=VALUE" if key in keys else "KEY=VALUE, e.g. optim.lr=1e-3"
        raise ConfigError(f"--set {assignment!r} has no '=': write --set {fix}")
    key, text = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {assignment!r}: the key before '=' is empty")
    try:
        return _set(config, key.split("."), text.strip(), key)
    except UnknownName:  # a valid key whose value names something unknown
        raise
    except KeyError:
        pass
    fields = [k for k in keys if k.startswith(key + ".")]
    if fields:
        raise ConfigError(
            f"config key {key!r} is a section, not a field; set one of its fields, e.g. "
            f"{_either(fields[:3])}"
        )
    near = closest_keys(key, keys)
    if near:
        raise ConfigError(f"unknown config key {key!r}; did you mean {_either(near)}?")
    sections = [
        f.name for f in dataclasses.fields(config) if any(k.startswith(f.name + ".") for k in keys)
    ]
    raise ConfigError(
        f"unknown config key {key!r}; keys are SECTION.FIELD with sections {', '.join(sections)} "
        "(e.g. optim.lr, loop.steps, model.n_layers)"
    )


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def to_dict(obj) -> dict:
    """A JSON-ready dict of any config (tuples become lists)."""
    return dataclasses.asdict(obj)
