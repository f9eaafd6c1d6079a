"""``llmjax distill``: train a student on a frozen teacher's next-token distributions.

llmjax distill --teacher runs/big --student llama3-tiny --data corpus.txt --out runs/small
llmjax distill --teacher runs/big --student llama3-tiny --data corpus.txt --kind jsd --beta 0.5
llmjax distill --teacher runs/big --student runs/small --data prompts.jsonl --on-policy-fraction 0.5
llmjax distill --teacher runs/big --student llama3-tiny --data corpus.txt --top-k 16 \\
    --teacher-cache runs/big-top16      # offline: the teacher's top-k written once
"""

from __future__ import annotations

import shlex
from pathlib import Path

from llmjax.cli import HelpFormatter, _absolute, finish


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "distill",
        help="distil a teacher (run or Hugging Face model) into a student",
        description="Knowledge distillation: the student learns the teacher's softened "
        "next-token distributions (forward KL, reverse KL, generalized JSD, top-k), on the "
        "data's text or on continuations it samples itself (GKD). Running it again resumes.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    sp.add_argument("--teacher", required=True, metavar="RUN_OR_HF_DIR", help="the frozen model")
    sp.add_argument(
        "--student",
        required=True,
        metavar="PRESET_OR_RUN_OR_HF",
        help="a preset to train from scratch (its vocabulary becomes the teacher's; shape it with "
        "--set model.d_model=...) or a model to start from",
    )
    sp.add_argument(
        "--data",
        required=True,
        nargs="+",
        action="extend",
        metavar="PATH",
        help="text files or directories (packed like pretraining), or one .jsonl file of TRL "
        "records (prompt/completion, messages, text)",
    )
    sp.add_argument("--out", default="runs/distill", metavar="DIR", help="the run's directory")
    sp.add_argument(
        "--kind",
        choices=("forward_kl", "reverse_kl", "jsd"),
        help="the divergence (default: forward_kl)",
    )
    for flag, var, text in [
        ("--beta", "B", "jsd: the teacher's weight in the mixture, in (0, 1) (default: 0.5)"),
        (
            "--temperature",
            "T",
            "softens both distributions; the loss is scaled by T^2 (default: 1)",
        ),
        ("--alpha", "A", "weight of the hard-label cross entropy (default: 0)"),
        ("--top-k", "K", "forward KL against the teacher's top-k only (default: 0, all)"),
        (
            "--on-policy-fraction",
            "L",
            "steps whose continuations the student samples, GKD's lambda (default: 0)",
        ),
        ("--steps", "N", "(loop.steps; default: the recipe's)"),
        ("--batch-size", "B", "(data.batch_size; default: the recipe's)"),
        ("--seq-len", "T", "(data.seq_len; default: the recipe's)"),
        ("--lr", "LR", "(optim.lr; default: the recipe's)"),
    ]:
        sp.add_argument(flag, metavar=var, help=text)
    sp.add_argument(
        "--seq-kd",
        action="store_true",
        help="train on continuations the teacher samples (sequence-level KD)",
    )
    sp.add_argument(
        "--teacher-cache",
        metavar="DIR",
        help="write the teacher's top-k logits here once and train from them (needs --top-k; "
        "default: online, the teacher in memory)",
    )
    sp.add_argument(
        "--quantize-teacher",
        choices=("int8", "nf4"),
        help="store the frozen teacher quantized (default: float32)",
    )
    sp.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. model.d_model=128, optim.lr=1e-3, prompt_len=64; "
        "repeatable (default: none)",
    )
    sp.set_defaults(fn=cmd_distill)


def build_config(args):
    import llmjax
    from llmjax.config import ConfigError
    from llmjax.data import DataConfig, SFTDataConfig
    from llmjax.recipes.distill import DistillConfig
    from llmjax.train.config import override

    paths = [_absolute(p) for p in args.data]
    if any(p.endswith(".jsonl") for p in paths):
        if len(paths) > 1:
            raise ConfigError("--data: give one .jsonl file of records, or text files only")
        # One record per row: on-policy sampling continues each row's own prompt.
        data = SFTDataConfig(path=paths[0], seq_len=256, batch_size=8, packing=False)
    else:
        data = DataConfig(paths=tuple(paths))
    student = args.student
    model = None if Path(student).exists() else llmjax.presets.get(student)
    cfg = DistillConfig(
        teacher=_absolute(args.teacher),
        student=_absolute(student) if model is None else student,
        data=data,
        model=model,
    )
    flags = {
        "kind": args.kind,
        "beta": args.beta,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "top_k": args.top_k,
        "on_policy_fraction": args.on_policy_fraction,
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "optim.lr": args.lr,
        # After --top-k: each assignment is checked against the settings before it.
        "seq_kd": "true" if args.seq_kd else None,
        "quantize_teacher": args.quantize_teacher,
        "teacher_cache": _absolute(args.teacher_cache) if args.teacher_cache else None,
    }
    for assignment in [f"{k}={v}" for k, v in flags.items() if v is not None] + list(
        args.set or []
    ):
        if assignment.startswith("model.") and model is None:
            raise ConfigError(
                f"--set {assignment}: the student starts from {student}, whose shape is fixed; "
                "model.* overrides shape a preset student"
            )
        cfg = override(cfg, assignment)
    return cfg


def cmd_distill(args) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()
    from llmjax.recipes import distill

    cfg = build_config(args)
    result = distill.run(cfg, args.out)
    run = shlex.quote(args.out)
    export = shlex.quote(args.out.rstrip("/") + "-hf")
    return finish(
        result,
        lambda: (
            f"next:\n  llmjax eval --ckpt {run}\n  llmjax generate --ckpt {run} --prompt "
            f'"Hello"\n  llmjax export --ckpt {run} --out {export}'
        ),
    )
