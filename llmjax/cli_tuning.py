"""The flags every command that tunes a base model shares (sft, dpo, reward, grpo, ppo): where
the base, the data and the run are, LoRA and QLoRA, bad records and ``--set`` overrides."""

from __future__ import annotations


def add_source_flags(sp, data: str, out: str) -> None:
    """``--base``, ``--data`` (described by ``data``) and ``--out`` (default ``out``)."""
    sp.add_argument(
        "--base", required=True, metavar="RUN_OR_HF_DIR", help="the model to start from"
    )
    sp.add_argument("--data", required=True, metavar="FILE.jsonl", help=data)
    sp.add_argument("--out", default=out, metavar="DIR", help="the run's directory")


def add_setting_flags(sp, settings) -> None:
    """One flag per ``(flag, metavar, config key, note)``; each defaults to the recipe's."""
    for flag, var, key, note in settings:
        sp.add_argument(flag, metavar=var, help=f"({key}{note}; default: the recipe's)")


def add_adapter_flags(sp, *, dropout: bool = False) -> None:
    """``--lora-rank``, ``--lora-alpha``, ``--lora-targets`` (``--lora-dropout``) and
    ``--quantize-base``."""
    sp.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="train LoRA adapters of this rank over a frozen base (default: full fine-tuning)",
    )
    sp.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default: 2 * rank)")
    sp.add_argument(
        "--lora-targets",
        metavar="REGEX",
        help="parameter paths that get adapters (default: attention q/k/v/o and MLP of every "
        "layer)",
    )
    if dropout:
        sp.add_argument(
            "--lora-dropout",
            type=float,
            metavar="P",
            help="dropout on the adapters' input during training, as PEFT's lora_dropout "
            "(default: 0)",
        )
    sp.add_argument(
        "--quantize-base",
        choices=("int8", "nf4"),
        help="store the frozen base quantized while adapters train in float32 (QLoRA; default: "
        "float32 base)",
    )


def add_closing_flags(sp, example: str) -> None:
    """``--strict`` and ``--set`` (``example``: overrides worth showing for this command)."""
    sp.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping"
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"override any config field, e.g. {example}; repeatable (default: none)",
    )


def lora_config(args):
    """The ``LoraConfig`` the adapter flags ask for, or None for full fine-tuning."""
    from llmjax.config import ConfigError
    from llmjax.lora import DEFAULT_TARGETS, LoraConfig

    dropout = getattr(args, "lora_dropout", None)
    if args.lora_rank is None:
        if args.lora_alpha is not None or args.lora_targets or dropout is not None:
            raise ConfigError("--lora-alpha, --lora-targets and --lora-dropout need --lora-rank R")
        return None
    return LoraConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
        targets=args.lora_targets or DEFAULT_TARGETS,
        dropout=dropout or 0.0,
    )


def apply_flags(cfg, flags: dict, args):
    """``cfg`` with each flag that was given (``{config key: value or None}``) and then each
    ``--set`` applied, in that order, as ``--set`` would apply them."""
    from llmjax.train.config import override

    if getattr(args, "strict", False):
        flags = {**flags, "data.strict": "true"}
    given = [f"{k}={v}" for k, v in flags.items() if v is not None]
    for assignment in given + list(args.set or []):
        cfg = override(cfg, assignment)
    return cfg
