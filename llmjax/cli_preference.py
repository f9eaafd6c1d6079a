"""``llmjax dpo`` and ``llmjax reward``: preference tuning on TRL-format pairs
({prompt, chosen, rejected}, strings or messages; or {chosen, rejected} with the prompt inside).

llmjax dpo --base runs/sft --data pairs.jsonl --out runs/dpo                        # DPO
llmjax dpo --base ./Qwen3-0.6B --data pairs.jsonl --loss ipo --beta 0.5 --lora-rank 16
llmjax dpo --base runs/sft --data pairs.jsonl --loss simpo --gamma 0.5 --out runs/simpo
llmjax reward --base runs/sft --data pairs.jsonl --out runs/rm                      # reward model
"""

from __future__ import annotations

import shlex

from llmjax.cli import HelpFormatter, _absolute, finish
from llmjax.cli_tuning import (
    add_adapter_flags,
    add_closing_flags,
    add_setting_flags,
    add_source_flags,
    apply_flags,
    lora_config,
)

_EXAMPLES = __doc__.split("\n\n", 1)[1]


def _common(sp, default_out: str) -> None:
    add_source_flags(sp, "the preference pairs (TRL format)", default_out)
    add_setting_flags(
        sp,
        [
            ("--steps", "N", "loop.steps", ""),
            ("--batch-size", "B", "data.batch_size", ", in pairs"),
            ("--seq-len", "T", "data.seq_len", ": prompt + completion tokens of each side"),
            ("--max-prompt-len", "P", "data.max_prompt_len", "; longer prompts lose their start"),
            ("--lr", "LR", "optim.lr", ""),
        ],
    )
    add_adapter_flags(sp)
    add_closing_flags(sp, "optim.lr=5e-7, loop.grad_accum=4")


def add_parser(sub) -> None:
    dp = sub.add_parser(
        "dpo",
        help="preference-tune a run or Hugging Face model: DPO, cDPO, hinge, IPO, robust, "
        "SimPO, ORPO",
        description="Direct preference optimisation and its variants on jsonl preference pairs. "
        "Running it again resumes.",
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    _common(dp, "runs/dpo")
    from llmjax.recipes.preference import LOSSES

    dp.add_argument(
        "--loss",
        choices=LOSSES,
        default="sigmoid",
        help="sigmoid: DPO (cDPO with --label-smoothing); hinge: SLiC; ipo; robust; simpo and "
        "orpo need no reference model",
    )
    dp.add_argument(
        "--beta",
        type=float,
        metavar="B",
        help="the reward scale (default: 2.0 for simpo, else 0.1)",
    )
    dp.add_argument(
        "--label-smoothing",
        type=float,
        metavar="E",
        help="the probability a label is flipped, for sigmoid (cDPO) and robust (default: 0)",
    )
    dp.add_argument(
        "--gamma", type=float, metavar="G", help="simpo's target reward margin (default: 0.5)"
    )
    dp.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        metavar="L",
        help="orpo's weight of the odds-ratio term (default: 0.1)",
    )
    dp.add_argument(
        "--reference",
        choices=("cached", "online"),
        help="cached: the reference's log-probs computed once before training (no reference "
        "in memory while training); online: in every step (default: cached)",
    )
    dp.set_defaults(fn=cmd_dpo)

    rp = sub.add_parser(
        "reward",
        help="train a reward model (a scalar head on a run or Hugging Face model) on pairs",
        description="Bradley-Terry reward modelling on jsonl preference pairs; the model scores "
        "a sequence at its last token. Running it again resumes.",
        epilog=_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    _common(rp, "runs/reward")
    rp.add_argument(
        "--center-coef",
        type=float,
        metavar="C",
        help="weight of mean((r_chosen + r_rejected)^2), centering rewards (default: 0)",
    )
    rp.set_defaults(fn=cmd_reward)


def build_config(args, kind: str):
    from llmjax.recipes.preference import DPOConfig, RewardConfig

    common = {
        "base": _absolute(args.base),
        "lora": lora_config(args),
        "quantize_base": args.quantize_base or "",
    }
    cfg = DPOConfig(**common) if kind == "dpo" else RewardConfig(**common)
    flags = {
        "data.path": _absolute(args.data),
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "data.max_prompt_len": args.max_prompt_len,
        "optim.lr": args.lr,
    }
    if kind == "dpo":
        flags.update(
            {
                "loss": args.loss,
                "beta": args.beta,
                "label_smoothing": args.label_smoothing,
                "gamma": args.gamma,
                "lam": args.lam,
                "reference": args.reference,
            }
        )
    else:
        flags["center_coef"] = args.center_coef
    return apply_flags(cfg, flags, args)


def _run(args, kind: str) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()
    from llmjax.recipes import preference

    cfg = build_config(args, kind)
    result = preference.run(cfg, args.out)
    run = shlex.quote(args.out)
    if kind == "reward":
        text = (
            f"  llmjax generate --ckpt POLICY_RUN --best-of 8 --reward-model {run} "
            '--prompt "Hello"\n'
            f"  llmjax export --ckpt {run} --out {shlex.quote(args.out.rstrip('/') + '-hf')}"
        )
    else:
        text = (
            f'  llmjax generate --ckpt {run} --prompt "Hello"\n'
            f"  llmjax export --ckpt {run} --out "
            + shlex.quote(args.out.rstrip("/") + ("-peft" if cfg.lora else "-hf"))
            + (" [--merge]" if cfg.lora else "")
        )
    return finish(result, lambda: f"saved {shlex.quote(args.out)}; next:\n{text}")


def cmd_dpo(args) -> int:
    return _run(args, "dpo")


def cmd_reward(args) -> int:
    return _run(args, "reward")
