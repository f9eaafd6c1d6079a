"""``llmjax grpo`` and ``llmjax ppo``: reinforcement learning on verifiable rewards (GRPO, Dr. GRPO, DAPO) from jsonl
prompts ({"prompt": text or messages, ...other fields the reward functions read}).

llmjax grpo --base runs/sft --data math.jsonl --reward answer_match --out runs/grpo
llmjax grpo --base runs/sft --data math.jsonl --reward answer_match --reward format_match \\
    --reward-weights 1,0.2 --num-generations 8 --max-new-tokens 128 --beta 0.04
llmjax grpo ... --loss-type dr_grpo --scale-rewards none                 # Dr. GRPO
llmjax grpo ... --loss-type dapo --epsilon-high 0.28 --dynamic-sampling --mask-truncated  # DAPO
llmjax grpo ... --reward my_rewards.py:score                             # your own function
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


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "grpo",
        help="RL on verifiable rewards: GRPO, Dr. GRPO and DAPO on jsonl prompts",
        description="Group relative policy optimisation: G completions of each prompt, scored by "
        "reward functions on text, advantages relative to the group. Running it again resumes.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    _common(sp, "runs/grpo")
    sp.add_argument(
        "--loss-type",
        choices=("grpo", "bnpo", "dapo", "dr_grpo"),
        help="how token losses average: per sequence then over sequences (grpo), over the "
        "batch's tokens (bnpo, dapo), or over B * max_new_tokens (dr_grpo) (default: grpo)",
    )
    sp.add_argument(
        "--scale-rewards",
        choices=("group", "batch", "none"),
        help="divide advantages by the group's reward std, the batch's, or nothing (Dr. GRPO) "
        "(default: group)",
    )
    sp.add_argument(
        "--dynamic-sampling",
        action="store_true",
        help="groups whose completions all score the same leave the loss (DAPO)",
    )
    sp.set_defaults(fn=cmd_grpo, kind="grpo")

    pp = sub.add_parser(
        "ppo",
        help="RL on verifiable rewards with PPO: a critic, GAE and a per-token KL penalty",
        description="Proximal policy optimisation: completions scored by reward functions (or a "
        "reward model), per-token advantages from a critic by GAE, several epochs per batch. "
        "Running it again resumes.",
        epilog="llmjax ppo --base runs/sft --data math.jsonl --reward answer_match --beta 0.05 \\\n"
        "    --num-iterations 4 --gamma 1 --lam 0.95 --vf-coef 0.1 --out runs/ppo",
        formatter_class=HelpFormatter,
    )
    _common(pp, "runs/ppo")
    for flag, var, key, text in [
        ("--gamma", "G", "gamma", ", GAE's discount"),
        ("--lam", "L", "lam", ", GAE's lambda"),
        ("--vf-coef", "C", "vf_coef", ", the value loss's weight"),
        ("--cliprange-value", "C", "cliprange_value", ", the value clip"),
        ("--ent-coef", "C", "ent_coef", ", the entropy bonus"),
    ]:
        pp.add_argument(flag, metavar=var, help=f"({key}{text}; default: the recipe's)")
    pp.set_defaults(fn=cmd_grpo, kind="ppo")


def _common(sp, out: str) -> None:
    add_source_flags(sp, "the prompts (and the fields reward functions read)", out)
    sp.add_argument(
        "--reward",
        action="append",
        metavar="NAME|MODULE:FUNCTION",
        help="a reward function: answer_match, format_match, length_penalty, or your own (a "
        "module or .py file, and a function of (prompts, completions, **fields)); repeatable "
        "(default: none)",
    )
    sp.add_argument(
        "--reward-model",
        metavar="RUN_OR_HF_DIR",
        help="a trained reward model (llmjax reward, or a ...ForSequenceClassification "
        "directory) scoring each completion, after the --reward functions (default: none)",
    )
    sp.add_argument(
        "--reward-weights",
        metavar="W1,W2,...",
        help="one weight per --reward, then one for --reward-model (default: 1 each)",
    )
    add_setting_flags(
        sp,
        [
            ("--steps", "N", "loop.steps", ""),
            ("--batch-size", "P", "data.batch_size", ", prompts per step"),
            ("--max-prompt-len", "L", "data.max_prompt_len", ", longer prompts keep their end"),
            ("--lr", "LR", "optim.lr", ""),
            ("--num-generations", "G", "num_generations", ", completions per prompt"),
            ("--max-new-tokens", "N", "max_new_tokens", ""),
            ("--temperature", "T", "temperature", ""),
            ("--beta", "B", "beta", ", KL to the reference (PPO: in the reward); 0 loads none"),
            ("--epsilon", "E", "epsilon", ", the ratio's clip"),
            ("--epsilon-high", "E", "epsilon_high", ", DAPO's clip-higher"),
            ("--num-iterations", "K", "num_iterations", ", updates per batch of completions"),
        ],
    )
    sp.add_argument(
        "--mask-truncated",
        action="store_true",
        help="completions that reach --max-new-tokens without stopping leave the loss (DAPO)",
    )
    sp.add_argument(
        "--log-completions",
        metavar="N",
        help="every N steps append the step's completions and rewards to completions.jsonl "
        "(default: never)",
    )
    add_adapter_flags(sp)
    add_closing_flags(sp, "optim.warmup_steps=10, eval_prompts=200")


def build_config(args):
    from llmjax.config import ConfigError
    from llmjax.recipes.ppo import PPOConfig
    from llmjax.recipes.rl import GRPOConfig

    weights = ()
    if args.reward_weights:
        try:
            weights = tuple(float(w) for w in args.reward_weights.split(","))
        except ValueError:
            raise ConfigError(
                f"--reward-weights {args.reward_weights!r}: write numbers separated by commas, "
                "one per --reward, e.g. 1,0.2"
            ) from None
    cfg = (PPOConfig if args.kind == "ppo" else GRPOConfig)(
        base=_absolute(args.base),
        rewards=tuple(args.reward or ()),
        reward_model=_absolute(args.reward_model) if args.reward_model else "",
        reward_weights=weights,
        lora=lora_config(args),
        quantize_base=args.quantize_base or "",
    )
    flags = {
        "data.path": _absolute(args.data),
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.max_prompt_len": args.max_prompt_len,
        "optim.lr": args.lr,
        "num_generations": args.num_generations,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "beta": args.beta,
        "epsilon": args.epsilon,
        "epsilon_high": args.epsilon_high,
        "num_iterations": args.num_iterations,
        "log_completions_every": args.log_completions,
        "mask_truncated_completions": "true" if args.mask_truncated else None,
    }
    if args.kind == "grpo":
        flags["loss_type"] = args.loss_type
        flags["scale_rewards"] = args.scale_rewards
        flags["dynamic_sampling"] = "true" if args.dynamic_sampling else None
    else:
        for key in ("gamma", "lam", "vf_coef", "cliprange_value", "ent_coef"):
            flags[key] = getattr(args, key)
    return apply_flags(cfg, flags, args)


def cmd_grpo(args) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()
    from llmjax.recipes import ppo, rl

    cfg = build_config(args)
    result = (ppo if args.kind == "ppo" else rl).run(cfg, args.out)
    run = shlex.quote(args.out)
    export = shlex.quote(args.out.rstrip("/") + ("-peft" if cfg.lora else "-hf"))
    return finish(
        result,
        lambda: (
            f"saved {run}; next:\n"
            f"  llmjax plot {run}    # the reward curve\n"
            f'  llmjax generate --ckpt {run} --prompt "..."\n'
            f"  llmjax export --ckpt {run} --out {export}"
        ),
    )
