"""llmjax: a JAX-native model zoo for large language models.

model = llmjax.build("llama3-tiny")
params = model.init(jax.random.key(0))
logits = model.apply(params, tokens)        # [B, T] int -> [B, T, V] float32
"""

from __future__ import annotations

import logging as _logging
import sys as _sys

from llmjax.config import ConfigError, ModelConfig, RopeConfig
from llmjax.models.model import KVCache, Model
from llmjax.presets import PRESETS


# Notices users must see (a damaged checkpoint skipped, an unlockable directory) go to stderr as
# one line each unless the application configures logging itself.
class _StderrHandler(_logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after import)."""

    stream = property(lambda self: _sys.stderr, lambda self, value: None)


_log = _logging.getLogger("llmjax")
if not _log.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(_logging.Formatter("llmjax: %(message)s"))
    _log.addHandler(_handler)
    _log.setLevel(_logging.WARNING)
    _log.propagate = False


def build(name_or_config: str | ModelConfig, **overrides) -> Model:
    """A ``Model`` from a preset name or a ``ModelConfig``; ``overrides`` replace config fields."""
    from llmjax import presets

    cfg = presets.get(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build() takes a preset name or a ModelConfig, got {type(cfg).__name__}")
    return Model(cfg.replace(**overrides) if overrides else cfg)


def generate(model, params, prompts, **kwargs):
    """Sample continuations of token-id prompts; see ``llmjax.inference.generate``."""
    from llmjax.inference import generate as _generate

    return _generate(model, params, prompts, **kwargs)


def load(path):
    """``(model, params)`` from a run of any recipe (LoRA adapters applied), ready for ``apply``."""
    from llmjax.runs import load as _load

    return _load(path)


def load_tokenizer(path):
    """The tokenizer of a run, a Hugging Face directory, a tokenizer.json or a .model file."""
    from llmjax.runs import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def load_reward_model(path):
    """A reward model (decoder, scalar head, tokenizer) from a ``llmjax reward`` run or a Hugging
    Face ``...ForSequenceClassification`` directory; see ``llmjax.inference.RewardModel``."""
    from llmjax.inference.reward import load_reward_model as _load_reward_model

    return _load_reward_model(path)


def from_hf(path, **kwargs):
    """Load a local Hugging Face model directory: returns ``(model, params)``."""
    from llmjax.interop.hf import from_hf as _from_hf

    return _from_hf(path, **kwargs)


def to_hf(model: Model, params, path, **kwargs):
    """Write ``params`` as a Hugging Face model directory that ``transformers`` loads."""
    from llmjax.interop.hf import to_hf as _to_hf

    return _to_hf(model, params, path, **kwargs)


__all__ = [
    "ConfigError",
    "KVCache",
    "Model",
    "ModelConfig",
    "PRESETS",
    "RopeConfig",
    "build",
    "from_hf",
    "generate",
    "load",
    "load_reward_model",
    "load_tokenizer",
    "to_hf",
]
