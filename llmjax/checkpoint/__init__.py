"""Orbax checkpoints of the train state: async saves, validated resume, export."""

from llmjax.checkpoint.manager import (
    CheckpointError,
    Checkpointer,
    read_meta,
    resolve_checkpoint,
    restore,
    restore_latest,
    step_dirs,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "read_meta",
    "resolve_checkpoint",
    "restore",
    "restore_latest",
    "step_dirs",
]
