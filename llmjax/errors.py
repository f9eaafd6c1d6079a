"""The errors llmjax raises for bad input, a bad file or a run it cannot continue.

Every one derives from ``LlmjaxError`` (catch it to handle them all) and from the built-in
exception a caller would already expect (``ValueError`` for a bad value, ``KeyError`` for an
unknown name), so ``except ValueError`` keeps working. Each message names the problem and the
fix in one sentence; the command line prints it as one line and exits with code 2.
"""

from __future__ import annotations


class LlmjaxError(Exception):
    """Base of every error llmjax raises on purpose (never for a bug in llmjax itself)."""


class ConfigError(LlmjaxError, ValueError):
    """A configuration field has a value llmjax cannot build."""


class DataError(LlmjaxError, ValueError):
    """The training data cannot be read or is unusable; the message says which input and why."""


class InputError(LlmjaxError, ValueError):
    """An argument of a call (token ids, shapes, sampling settings) is out of its valid range."""


class UnknownName(LlmjaxError, KeyError):
    """An unknown preset, recipe or config key; ``str()`` is the message, not its ``repr``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointError(LlmjaxError, RuntimeError):
    """A training checkpoint is missing, unreadable, or cannot be written."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files are proven damaged (missing, truncated, failed checksum)."""


class CheckpointMismatch(CheckpointError):
    """A sound checkpoint written by a run with another configuration."""


class RunInUse(LlmjaxError, RuntimeError):
    """Another live process is training into the same output directory."""


class HFCheckpointError(LlmjaxError, ValueError):
    """A Hugging Face directory that is malformed or does not match its config."""


class RewardError(LlmjaxError, ValueError):
    """A reward function raised, or returned a value that cannot be a reward; the message names
    the function, the problem and the first offending completion."""


def one_line(e: BaseException) -> str:
    """An error's message on one line (``KeyError`` without its quotes)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__
