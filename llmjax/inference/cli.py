"""``llmjax generate``: sample from a checkpoint or a Hugging Face directory, streaming to stdout.

    llmjax generate --ckpt runs/pretrain --prompt "To be" --temperature 0.8 --top-p 0.9
    llmjax generate --hf DIR --prompt-ids 1,5,9 --max-new-tokens 20          # no tokenizer needed
    llmjax generate --hf DIR --prompt "x" --draft SMALL_DIR --quantize int8   # speculative, int8
    llmjax generate --ckpt runs/sft --chat --prompt "What is two plus two?"     # chat template
    llmjax generate --ckpt runs/sft --prompt "x" --best-of 8 --reward-model runs/rm  # best of 8

A Hugging Face directory's tokenizer is its ``tokenizer.json`` or ``tokenizer.model`` (what
``llmjax export`` writes); without one, give the prompt as ids with ``--prompt-ids``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmjax.inference import validate


def load(path: str, kind: str):
    """``(model, params, tokenizer or None)`` from a run / step directory or a HF directory."""
    if kind == "ckpt":
        from llmjax.runs import load_run

        run = load_run(path)
        return run.model, run.params, run.tokenizer
    import llmjax
    from llmjax.data.hf_tokenizer import open_tokenizer

    model, params = llmjax.from_hf(path)
    return model, params, (open_tokenizer(path) if _has_tokenizer(path) else None)


def _has_tokenizer(path) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def parser() -> argparse.ArgumentParser:
    from llmjax.cli import Parser

    p = Parser(
        prog="llmjax generate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.HelpFormatter,  # each help names its default itself
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--ckpt", help="a training run or one of its step directories (no default: this or --hf)"
    )
    src.add_argument("--hf", help="a Hugging Face model directory (no default: this or --ckpt)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument(
        "--prompt", help="text, encoded by the model's tokenizer (no default: this or --prompt-ids)"
    )
    text.add_argument(
        "--prompt-ids", help="comma-separated token ids, e.g. 1,5,9 (no default: this or --prompt)"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="--prompt is a user message: wrap it in the model's chat template and stop at the "
        "end of the reply (default: %(default)s, a plain continuation)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=100,
        help="at most this many new tokens (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy (default: %(default)s)"
    )
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: off)")
    p.add_argument(
        "--top-p",
        type=float,
        help="keep the most likely tokens up to this mass, in (0, 1] (default: off)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        help="keep tokens at least this times as likely as the top one (default: off)",
    )
    p.add_argument("--repetition-penalty", type=float, help="> 0; 1 changes nothing (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--stop-ids", help="comma-separated stop ids (default: the tokenizer's eos)")
    p.add_argument(
        "--draft", help="draft model directory (run or HF) for speculative decoding (default: none)"
    )
    p.add_argument(
        "--num-draft",
        type=int,
        default=4,
        help="draft tokens per verification (default: %(default)s)",
    )
    p.add_argument(
        "--best-of",
        type=int,
        metavar="N",
        help="draw N samples and print the one rated highest, with its score (default: off, one "
        "streamed sample)",
    )
    p.add_argument(
        "--reward-model",
        metavar="DIR",
        help="rates the --best-of samples: a run trained with `llmjax reward` or a Hugging Face "
        "...ForSequenceClassification directory, with the generating model's tokenizer "
        "(default: none, the mean log-probability rates them)",
    )
    p.add_argument(
        "--quantize", choices=("int8", "int4"), help="weight-only quantization (default: none)"
    )
    p.add_argument(
        "--group-size", type=int, default=64, help="int4 group size (default: %(default)s)"
    )
    return p


def _ids(flag: str, text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        validate.fail(flag, repr(text), "give comma-separated int token ids, e.g. 1,5,9", True)


def _source(path: str) -> str:
    return "hf" if (Path(path) / "config.json").is_file() else "ckpt"


_WHAT = {
    "ckpt": "a training run (e.g. runs/pretrain) or one of its step directories",
    "hf": "a local Hugging Face model directory",
    "draft": "a run or Hugging Face directory of a draft model",
    "reward_model": "a reward run or a Hugging Face ...ForSequenceClassification directory",
}


def check_args(args) -> None:
    """Everything that can be checked before a model is loaded, named as the flags spell it."""
    validate.settings(
        flags=True,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        num_draft=args.num_draft,
    )
    validate.integer("group_size", args.group_size, flags=True)
    validate.integer("best_of", args.best_of, flags=True, none_is="one streamed sample")
    if args.reward_model is not None and args.best_of is None:
        validate.fail(
            "reward_model",
            args.reward_model,
            "it rates the samples of --best-of; add --best-of N",
            True,
        )
    if args.best_of is not None and args.draft:
        validate.fail(
            "best_of",
            args.best_of,
            "best-of-N samples without speculative decoding; drop --draft or --best-of",
            True,
        )
    if args.best_of is not None and args.best_of > 1 and args.temperature == 0:
        validate.fail(
            "temperature",
            args.temperature,
            f"greedy decoding draws the same sample all {args.best_of} times; give a "
            "temperature > 0 for --best-of",
            True,
        )
    if args.draft and args.repetition_penalty is not None:
        validate.fail(
            "repetition_penalty",
            args.repetition_penalty,
            "speculative decoding (--draft) takes no history penalty; drop one of them",
            True,
        )
    for flag in ("ckpt", "hf", "draft", "reward_model"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            validate.fail(flag, path, f"no such file or directory; give {_WHAT[flag]}", True)
    if args.prompt_ids is not None and not _ids("prompt_ids", args.prompt_ids):
        validate.fail("prompt_ids", repr(args.prompt_ids), "give at least one token id", True)
    if args.stop_ids is not None:
        _ids("stop_ids", args.stop_ids)
    if args.hf and args.prompt is not None and not _has_tokenizer(args.hf):
        validate.fail(
            "prompt",
            repr(args.prompt),
            f"{args.hf} has no tokenizer.model or tokenizer.json to encode it; give token ids "
            "with --prompt-ids",
            True,
        )
    if args.chat and args.prompt is None:
        validate.fail(
            "chat", "--prompt-ids", "--chat needs the message as text: give --prompt", True
        )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    from llmjax.inference import (
        QuantizedModel,
        best_of_n,
        generate,
        quantize,
        speculative_generate,
    )

    kind, path = ("ckpt", args.ckpt) if args.ckpt else ("hf", args.hf)
    model, params, tok = load(path, kind)
    V = model.config.vocab_size
    if tok is not None and tok.vocab_size > V:
        validate.fail(
            kind,
            path,
            f"its tokenizer has {tok.vocab_size} pieces but the model only {V} ids; the "
            "tokenizer does not belong to this model",
            True,
        )
    if args.chat:
        message = [{"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(message, add_generation_prompt=True)
    elif args.prompt is not None:
        prompt = tok.encode(args.prompt, add_special_tokens=True)
    else:
        prompt = validate.token_ids("prompt_ids", _ids("prompt_ids", args.prompt_ids), V, True)
    if args.stop_ids:
        stops = validate.token_ids("stop_ids", _ids("stop_ids", args.stop_ids), V, True)
    else:
        stops = list(tok.stop_ids) if tok else []
    if args.quantize:
        params = quantize(model, params, args.quantize, args.group_size)
        model = QuantizedModel(model)
    # A model's vocabulary is often padded beyond its tokenizer's: ids the tokenizer cannot
    # decode are never drawn.
    unused = list(range(tok.vocab_size, V)) if tok is not None and tok.vocab_size < V else None
    sampling = dict(
        forbidden_tokens=unused,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        stop_tokens=stops,
        seed=args.seed,
    )
    reward = _reward_model(args, kind, path, tok) if args.reward_model else None
    if args.prompt is not None and not args.chat:
        sys.stdout.write(args.prompt)
    sys.stdout.flush()

    if args.best_of is not None:
        best = best_of_n(
            model, params, prompt, args.best_of, reward_model=reward,
            repetition_penalty=args.repetition_penalty, **sampling,
        )  # fmt: skip
        tokens = best.tokens
        sys.stdout.write(tok.decode(tokens) if tok and args.prompt is not None else _show(tokens))
        by = f"the reward model {args.reward_model}" if reward else "mean log-probability"
        print(f"\n[best of {args.best_of} by {by}: {best.score:.4f}]")
        return 0

    if args.draft:
        draft, draft_params, _ = load(args.draft, _source(args.draft))
        out = speculative_generate(
            model, params, draft, draft_params, [prompt], num_draft=args.num_draft, **sampling
        )
        tokens = out.tokens[0]
        sys.stdout.write(tok.decode(tokens) if tok and args.prompt is not None else _show(tokens))
        print(f"\n[acceptance rate {out.acceptance_rate:.2f}, {out.target_calls} target calls]")
        return 0

    emitted: list[int] = []
    shown = [""]

    def stream(step, tokens, live):
        if not live[0]:
            return
        emitted.append(int(tokens[0]))
        if tok is not None and args.prompt is not None:
            text = tok.decode(emitted)  # decode the whole so pieces join with the right spaces
            sys.stdout.write(text[len(shown[0]) :])
            shown[0] = text
        else:
            sys.stdout.write(("," if len(emitted) > 1 else "") + str(emitted[-1]))
        sys.stdout.flush()

    generate(
        model, params, [prompt], repetition_penalty=args.repetition_penalty, callback=stream,
        **sampling,
    )  # fmt: skip
    print()
    return 0


def _reward_model(args, kind: str, path: str, tok):
    """The ``--reward-model``, refused unless its tokenizer is the generating model's: its scores
    mean nothing for ids from another vocabulary."""
    from llmjax.inference import load_reward_model

    reward = load_reward_model(args.reward_model)
    theirs = reward.tokenizer
    if tok is None or theirs is None:
        missing = f"--{kind} {path}" if tok is None else f"--reward-model {args.reward_model}"
        validate.fail(
            "reward_model",
            args.reward_model,
            f"{missing} has no tokenizer, so the two cannot be checked to share one; put the "
            "tokenizer.json or tokenizer.model both were trained with into that directory",
            True,
        )
    if theirs.sha256 != tok.sha256:
        validate.fail(
            "reward_model",
            args.reward_model,
            f"its tokenizer (sha256 {theirs.sha256[:12]}) is not the one of --{kind} {path} "
            f"(sha256 {tok.sha256[:12]}); give a reward model trained from this model's "
            f"tokenizer, e.g. llmjax reward --base {path} --data pairs.jsonl --out DIR",
            True,
        )
    return reward


def _show(tokens: list[int]) -> str:
    return ",".join(str(t) for t in tokens)


if __name__ == "__main__":
    sys.exit(main())
