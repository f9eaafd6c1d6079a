"""``llmjax sft``: fine-tune a llmjax run or a Hugging Face model on TRL-format jsonl records.

llmjax sft --base runs/pretrain --data chat.jsonl --out runs/sft                  # full
llmjax sft --base ./Qwen3-0.6B --data chat.jsonl --lora-rank 16 --out runs/lora   # LoRA
llmjax sft --base ./Qwen3-0.6B --data chat.jsonl --lora-rank 16 --quantize-base nf4  # QLoRA
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llmjax.cli import HelpFormatter, _absolute, finish


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "sft",
        help="fine-tune a run or Hugging Face model on jsonl records (full, LoRA or QLoRA)",
        description="Supervised fine-tuning on TRL-format jsonl ({prompt, completion}, {messages} "
        "or {text}); loss on completions and assistant turns only. Running it again resumes.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    sp.add_argument(
        "--base", required=True, metavar="RUN_OR_HF_DIR", help="the model to start from"
    )
    sp.add_argument("--data", required=True, metavar="FILE.jsonl", help="the training records")
    sp.add_argument("--out", default="runs/sft", metavar="DIR", help="the run's directory")
    for flag, var, key in [
        ("--steps", "N", "loop.steps"),
        ("--batch-size", "B", "data.batch_size"),
        ("--seq-len", "T", "data.seq_len"),
        ("--lr", "LR", "optim.lr"),
    ]:
        sp.add_argument(flag, metavar=var, help=f"({key}; default: the recipe's)")
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
    sp.add_argument(
        "--lora-dropout",
        type=float,
        metavar="P",
        help="dropout on the adapters' input during training, as PEFT's lora_dropout (default: 0)",
    )
    sp.add_argument(
        "--quantize-base",
        choices=("int8", "nf4"),
        help="store the frozen base quantized while adapters train in float32 (QLoRA; default: "
        "float32 base)",
    )
    sp.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping"
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. optim.lr=2e-4, data.packing=false, "
        "loop.grad_accum=4; repeatable (default: none)",
    )
    sp.set_defaults(fn=cmd_sft)


def build_config(args):
    from llmjax.lora import DEFAULT_TARGETS, LoraConfig
    from llmjax.recipes.sft import SFTConfig
    from llmjax.train.config import override

    lora = None
    if args.lora_rank is not None:
        lora = LoraConfig(
            rank=args.lora_rank,
            alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
            targets=args.lora_targets or DEFAULT_TARGETS,
            dropout=args.lora_dropout or 0.0,
        )
    elif args.lora_alpha is not None or args.lora_targets or args.lora_dropout is not None:
        from llmjax.config import ConfigError

        raise ConfigError("--lora-alpha, --lora-targets and --lora-dropout need --lora-rank R")
    cfg = SFTConfig(base=_absolute(args.base), lora=lora, quantize_base=args.quantize_base or "")
    flags = {
        "data.path": _absolute(args.data),
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "optim.lr": args.lr,
        "data.strict": "true" if args.strict else None,
    }
    for assignment in [f"{k}={v}" for k, v in flags.items() if v is not None] + list(
        args.set or []
    ):
        cfg = override(cfg, assignment)
    return cfg


def cmd_sft(args) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()
    from llmjax.recipes import sft

    cfg = build_config(args)
    result = sft.run(cfg, args.out)
    run = shlex.quote(args.out)
    export = shlex.quote(args.out.rstrip("/") + ("-peft" if cfg.lora else "-hf"))
    saved = shlex.quote(str(Path(args.out) / "checkpoints" / str(result.step)))
    return finish(
        result,
        lambda: (
            f"saved {saved}; next:\n"
            f'  llmjax generate --ckpt {run} --chat --prompt "Hello"\n'
            f"  llmjax export --ckpt {run} --out {export}" + (" [--merge]" if cfg.lora else "")
        ),
    )
