"""``llmjax sft``: fine-tune a llmjax run or a Hugging Face model on TRL-format jsonl records.

llmjax sft --base runs/pretrain --data chat.jsonl --out runs/sft                  # full
llmjax sft --base ./Qwen3-0.6B --data chat.jsonl --lora-rank 16 --out runs/lora   # LoRA
llmjax sft --base ./Qwen3-0.6B --data chat.jsonl --lora-rank 16 --quantize-base nf4  # QLoRA
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llmjax.cli import HelpFormatter, _absolute, finish
from llmjax.cli_tuning import (
    add_adapter_flags,
    add_closing_flags,
    add_setting_flags,
    add_source_flags,
    apply_flags,
    lora_config,
)


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "sft",
        help="fine-tune a run or Hugging Face model on jsonl records (full, LoRA or QLoRA)",
        description="Supervised fine-tuning on TRL-format jsonl ({prompt, completion}, {messages} "
        "or {text}); loss on completions and assistant turns only. Running it again resumes.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    add_source_flags(sp, "the training records", "runs/sft")
    add_setting_flags(
        sp,
        [
            ("--steps", "N", "loop.steps", ""),
            ("--batch-size", "B", "data.batch_size", ""),
            ("--seq-len", "T", "data.seq_len", ""),
            ("--lr", "LR", "optim.lr", ""),
        ],
    )
    add_adapter_flags(sp, dropout=True)
    add_closing_flags(sp, "optim.lr=2e-4, data.packing=false, loop.grad_accum=4")
    sp.set_defaults(fn=cmd_sft)


def build_config(args):
    from llmjax.recipes.sft import SFTConfig

    cfg = SFTConfig(
        base=_absolute(args.base), lora=lora_config(args), quantize_base=args.quantize_base or ""
    )
    flags = {
        "data.path": _absolute(args.data),
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "optim.lr": args.lr,
    }
    return apply_flags(cfg, flags, args)


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
