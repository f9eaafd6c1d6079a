"""Orbax checkpoints of the train state: async saves, validated resume, export."""

from llmjax.checkpoint.manager import (
    CheckpointDamaged,
    Checkpointer,
    CheckpointError,
    CheckpointMismatch,
    checkpoint_candidates,
    read_meta,
    resolve_checkpoint,
    restore,
    restore_latest,
    step_dirs,
)

__all__ = [
    "CheckpointDamaged",
    "CheckpointError",
    "checkpoint_candidates",
    "CheckpointMismatch",
    "Checkpointer",
    "read_meta",
    "resolve_checkpoint",
    "restore",
    "restore_latest",
    "step_dirs",
]
