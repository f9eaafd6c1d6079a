"""One training loop for every recipe: pure jitted step, orbax checkpoints, metrics."""

from llmjax.losses import masked_cross_entropy, next_token_loss
from llmjax.train.config import (
    LoopConfig,
    OptimizerConfig,
    TrainConfig,
    model_config_from_dict,
    override,
    valid_keys,
)
from llmjax.train.loop import TrainingDiverged, TrainResult, evaluate, train
from llmjax.train.optim import lr_schedule, make_optimizer
from llmjax.train.step import init_state, make_eval_step, make_train_step
from llmjax.train.task import Task, join, split_trainable

__all__ = [
    "LoopConfig",
    "OptimizerConfig",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "evaluate",
    "init_state",
    "join",
    "lr_schedule",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "masked_cross_entropy",
    "model_config_from_dict",
    "next_token_loss",
    "override",
    "split_trainable",
    "train",
    "valid_keys",
]
