"""The complete, frozen description of a training run: model + data + optimizer + loop.

A recipe is a Python function returning one ``TrainConfig``; the command line changes it only
through ``override(config, "section.field=value")``, which type-checks the value against the field
and names the valid keys on a typo.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field

from llmjax.config import ConfigError, ModelConfig
from llmjax.data.pipeline import DataConfig

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
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 3
    keep_best: bool = True  # also keep the checkpoint with the lowest eval loss
    async_save: bool = True
    mesh: str = ""  # "data=2,fsdp=-1"; empty: every device on the data axis
    rules: str = ""  # parallelism preset (dp, fsdp, tp, fsdp_tp, ep); empty: implied by the mesh
    sample_tokens: int = 64  # length of the sample printed at the end; 0 disables
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "eval_batches", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name}={getattr(self, name)}: must be >= 1")
        for name in ("eval_every", "save_every", "sample_tokens"):
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


def override(config: TrainConfig, assignment: str) -> TrainConfig:
    """Apply one ``section.field=value``; an unknown key raises ``ConfigError`` listing valid ones."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value, e.g. optim.lr=1e-3")
    key, text = assignment.split("=", 1)
    key = key.strip()
    try:
        return _set(config, key.split("."), text.strip(), key)
    except KeyError:
        raise ConfigError(
            f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(config))}"
        ) from None


def to_dict(obj) -> dict:
    """A JSON-ready dict of any config (tuples become lists)."""
    return dataclasses.asdict(obj)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Rebuild a ``ModelConfig`` saved with ``to_dict`` (nested rope configs, tuple fields)."""
    from llmjax.config import RopeConfig

    d = dict(d)
    for k in ("rope", "local_rope"):
        if isinstance(d.get(k), dict):
            d[k] = RopeConfig(**d[k])
    for f in dataclasses.fields(ModelConfig):
        if isinstance(d.get(f.name), list):
            d[f.name] = tuple(d[f.name])
    return ModelConfig(**d)
