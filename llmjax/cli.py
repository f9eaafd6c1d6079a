"""The ``llmjax`` command line: train, evaluate, sample, export, plot, plan memory, tokenizers.

Every command explains itself (``llmjax COMMAND --help`` lists its options with their defaults)
and ends bad input with one line naming the input and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import warnings
from pathlib import Path

EPILOG = "Run `llmjax COMMAND --help` for a command's options; docs/training.md explains them."


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help, unless the help already says where it comes
    from (``default: the recipe's``); descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default:" in text
            or action.required
            or not action.option_strings
            or action.default in (None, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other llmjax error (the
    usage itself is one ``--help`` away)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _absolute(spec: str) -> str:
    """``spec`` (a file, directory or glob) against the working directory of this command.

    The config is saved in every checkpoint and read again by ``eval`` and ``generate``, possibly
    from another directory; a relative path would then name another file, or none.
    """
    return os.path.abspath(os.path.expanduser(spec))


# --- pretrain ------------------------------------------------------------------------------------


def build_pretrain_config(args):
    """The recipe's config with ``--preset`` and the flag / ``--set`` overrides applied."""
    from llmjax.recipes import pretrain
    from llmjax.train.config import override

    cfg = pretrain.get(args.recipe)
    if args.preset:
        cfg = pretrain.with_preset(cfg, args.preset)
    sets = list(args.set or [])
    flags = {
        "data.paths": ",".join(map(_absolute, args.data)) if args.data else None,
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "loop.save_every": args.save_every,
        "loop.log_every": args.log_every,
        "loop.mesh": args.mesh,
        "data.tokenizer": _absolute(args.tokenizer) if args.tokenizer else None,
    }
    sets = [f"{k}={v}" for k, v in flags.items() if v is not None] + sets
    for assignment in sets:
        cfg = override(cfg, assignment)
    return cfg


def next_steps(out: str, step: int, prompt: str) -> str:
    """Where a finished run saved, and the commands that use it (``out`` as the user typed it)."""
    run = shlex.quote(out)
    saved = shlex.quote(str(Path(out) / "checkpoints" / str(step)))
    return (
        f"saved {saved}; next:\n"
        f'  llmjax generate --ckpt {run} --prompt "{prompt}"\n'
        f"  llmjax eval --ckpt {run}\n"
        f"  llmjax export --ckpt {run} --out {shlex.quote(out.rstrip('/') + '-hf')}"
    )


def cmd_pretrain(args) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()  # a no-op for one process; automatic on Cloud TPU
    from llmjax.recipes import pretrain

    cfg = build_pretrain_config(args)
    result = pretrain.run(cfg, args.out)
    # The default corpus is Python source: a prompt it can continue.
    prompt = "The " if cfg.data.paths else "def "
    return finish(result, lambda: next_steps(args.out, result.step, prompt))


def finish(result, next_steps) -> int:
    """A training command's exit: 128 + the signal when it stopped early (the same command
    resumes), else 0, with ``next_steps()`` printed by process 0 after a run that trained."""
    import llmjax.distributed

    if result.stopped == "complete":  # reported by the recipe; nothing trained
        return 0
    if result.stopped != "done":
        print(f"stopped at step {result.step}; run the same command to resume", file=sys.stderr)
        return 128 + (result.signum or 15)  # the shell's convention for "killed by signal"
    if llmjax.distributed.is_main_process():
        print(next_steps())
    return 0


# --- using a trained run ----------------------------------------------------------------------------------


def _cmd_eval(args) -> int:
    from llmjax.cli_eval import cmd_eval

    return cmd_eval(args)


def cmd_export(args) -> int:
    import llmjax
    from llmjax.checkpoint.manager import absolute
    from llmjax.errors import ConfigError
    from llmjax.runs import load_run

    run = load_run(args.ckpt)
    out, run_dir = absolute(args.out), run.step_dir.parent.parent
    if out == run_dir or run_dir / "checkpoints" in (out, *out.parents):
        raise ConfigError(
            f"--out {args.out} is the run's own directory; export to a directory of its own, "
            f"e.g. --out {args.ckpt.rstrip('/')}-hf"
        )
    if run.head is not None:
        # A PEFT directory has no place for the head: a reward model is written whole.
        from llmjax.inference.reward import pad_id_for_export
        from llmjax.interop.hf_score import to_hf_scorer

        pad = pad_id_for_export(run.tokenizer, run.model.config.vocab_size)
        if pad == run.tokenizer.eos_id:
            print(
                f"note: {args.out} pads with eos ({pad}), the tokenizer having no other id to "
                "spare; transformers then scores a sequence that ends in eos at the token before",
                file=sys.stderr,
            )
        to_hf_scorer(run.model, run.params, run.head, out, pad_token_id=pad)
        merged = ", adapters merged" if run.lora is not None else ""
        what = (
            f"a Hugging Face reward model (...ForSequenceClassification{merged}; pad batches "
            f"with id {pad})"
        )
    elif run.lora is not None and not args.merge:
        from llmjax.interop.peft import to_peft

        base = run.meta["config"]["base"]
        to_peft(run.model, run.adapters, run.lora, out, base_model_name_or_path=base)
        what = f"LoRA adapters (PEFT) for the base {base}"
    else:
        llmjax.to_hf(run.model, run.params, out)
        what = "a Hugging Face model" + (" (adapters merged)" if run.lora is not None else "")
    run.tokenizer.save(out)
    print(f"wrote {what} to {args.out} from {run.step_dir}")
    return 0


def cmd_plot(args) -> int:
    import importlib.util

    from llmjax.config import ConfigError
    from llmjax.train.plot import plot_run

    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("llmjax plot needs matplotlib: pip install matplotlib")
    out = plot_run(args.dir, args.out)
    print(f"wrote {out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from llmjax.data import TokenizerConfig, read_documents, resolve_paths
    from llmjax.data.tokenizer import Tokenizer, check_pieces, training_lines

    cfg = TokenizerConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, max_lines=args.max_lines
    )
    docs = read_documents(resolve_paths(args.data), args.text_field)
    tok = Tokenizer.train(training_lines((d.text for d in docs), cfg.max_lines, cfg.seed), cfg)
    check_pieces(tok, cfg.vocab_size, "--vocab-size")  # before anything is written
    tok.save(args.out)
    print(f"wrote {args.out}: {cfg.model_type}, {tok.vocab_size} pieces")
    return 0


# --- parser ---------------------------------------------------------------------------------------

RECIPE_DEFAULT = "default: the recipe's"
CKPT_HELP = (
    "a run directory, its checkpoints/ directory or one step directory (the newest complete "
    "checkpoint is used)"
)


def _recipes_epilog() -> str:
    from llmjax.recipes.pretrain import RECIPES

    width = max(map(len, RECIPES)) + 4
    lines = []
    for name, fn in RECIPES.items():
        summary = (fn.__doc__ or "").strip().splitlines()[0].replace("``", "")
        wrapped = textwrap.wrap(summary, 88 - width) or [""]
        lines += [f"  {name:<{width - 2}}{wrapped[0]}", *(" " * width + w for w in wrapped[1:])]
    return "recipes (--recipe):\n" + "\n".join(lines) + "\n\n" + EPILOG


def _add_pretrain(sub) -> None:
    from llmjax.recipes.pretrain import RECIPES

    pt = sub.add_parser(
        "pretrain",
        help="train a model from scratch; running it again resumes from --out",
        description="Train a recipe's model, resuming from --out when it holds a run.",
        epilog=_recipes_epilog(),
        formatter_class=HelpFormatter,
    )
    pt.add_argument(
        "--recipe", default="default", metavar="NAME", help=f"one of {', '.join(RECIPES)}"
    )
    pt.add_argument(
        "--preset",
        metavar="NAME",
        help="replace the recipe's model by this model preset, e.g. llama3-tiny (default: the "
        "recipe's model)",
    )
    pt.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="text files, directories or globs (.txt, .md, .py, .jsonl) (default: the recipe's; "
        "the default recipe samples the Python standard library)",
    )
    pt.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="an existing SentencePiece .model (default: train one on the data, kept in "
        "OUT/tokenizer)",
    )
    pt.add_argument(
        "--out",
        default="runs/pretrain",
        metavar="DIR",
        help="the run's directory (checkpoints, metrics, tokenizer); running again resumes it",
    )
    for flag, var, key, what in [
        ("--steps", "N", "loop.steps", "optimizer steps in all"),
        ("--batch-size", "B", "data.batch_size", "sequences per optimizer step, all devices"),
        ("--seq-len", "T", "data.seq_len", "tokens per sequence"),
        ("--save-every", "N", "loop.save_every", "steps between checkpoints"),
        ("--log-every", "N", "loop.log_every", "steps between progress and metrics lines"),
    ]:
        pt.add_argument(flag, type=int, metavar=var, help=f"{what} ({key}; {RECIPE_DEFAULT})")
    pt.add_argument(
        "--mesh",
        metavar="SPEC",
        help="device mesh axis sizes, e.g. data=2,fsdp=-1 (loop.mesh; default: the recipe's, "
        "every device on data)",
    )
    pt.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. optim.lr=1e-3 or model.remat=dots; repeatable, "
        "applied after the flags (default: none)",
    )
    pt.set_defaults(fn=cmd_pretrain)


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="llmjax",
        description="Train, evaluate, sample, export and size language models written in JAX.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pretrain(sub)
    from llmjax.cli_distill import add_parser as _add_distill
    from llmjax.cli_preference import add_parser as _add_preference
    from llmjax.cli_rl import add_parser as _add_rl
    from llmjax.cli_sft import add_parser as _add_sft

    _add_sft(sub)
    _add_distill(sub)
    _add_preference(sub)
    _add_rl(sub)

    ev = sub.add_parser(
        "eval",
        help="held-out loss and perplexity of a trained run",
        description="Loss and perplexity of a checkpoint, on its run's held-out split or --data.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    ev.add_argument("--ckpt", required=True, metavar="DIR", help=CKPT_HELP)
    ev.add_argument(
        "--data",
        nargs="+",
        metavar="PATH",
        help="files, directories or globs to evaluate on (default: the run's own held-out split, "
        "rebuilt from its saved data config)",
    )
    ev.add_argument(
        "--seq-len",
        type=positive_int,
        metavar="T",
        help="tokens per sequence, at most the model's max_seq_len (default: the run's)",
    )
    ev.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="B", help="sequences per batch"
    )
    ev.add_argument(
        "--max-batches",
        type=positive_int,
        default=50,
        metavar="N",
        help="batches evaluated at most",
    )
    ev.set_defaults(fn=_cmd_eval)

    # Its own parser owns its flags (`llmjax generate --help`); listed here for the overview.
    sub.add_parser(
        "generate",
        help="sample a continuation from a run or a Hugging Face directory",
        add_help=False,
    ).set_defaults(fn=None)

    ex = sub.add_parser(
        "export",
        help="write a Hugging Face directory (or a PEFT adapter directory) from a trained run",
        description="Write config.json, model.safetensors and the tokenizer from a checkpoint; "
        "a LoRA run's adapters as a PEFT directory unless --merge.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    ex.add_argument("--ckpt", required=True, metavar="DIR", help=CKPT_HELP)
    ex.add_argument("--out", required=True, metavar="HF_DIR", help="directory to write")
    ex.add_argument(
        "--merge",
        action="store_true",
        help="for a LoRA run: write the base with the adapters merged in, a plain Hugging Face "
        "model (default: the adapters alone, as a PEFT directory)",
    )
    ex.set_defaults(fn=cmd_export)

    pl = sub.add_parser(
        "plot",
        help="draw a run's training and held-out loss curves as a PNG",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    pl.add_argument("dir", metavar="DIR", help="a run directory (holding metrics.jsonl)")
    pl.add_argument("--out", metavar="PNG", help="image to write (default: DIR/loss.png)")
    pl.set_defaults(fn=cmd_plot)

    sub.add_parser(
        "plan", help="memory per device of a training step, and what fits", add_help=False
    ).set_defaults(fn=None)

    tk = sub.add_parser(
        "tokenizer",
        help="tokenizer tools (llmjax tokenizer train)",
        formatter_class=HelpFormatter,
    )
    tks = tk.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    tt = tks.add_parser(
        "train",
        help="train a SentencePiece tokenizer on text files",
        description="Train a SentencePiece tokenizer as `llmjax pretrain` does, and save it.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    tt.add_argument(
        "--data", nargs="+", required=True, metavar="PATH", help="files, directories or globs"
    )
    tt.add_argument(
        "--vocab-size", type=int, default=1024, metavar="N", help="pieces, at least 300"
    )
    tt.add_argument(
        "--model-type", choices=("bpe", "unigram"), default="bpe", help="SentencePiece algorithm"
    )
    tt.add_argument(
        "--max-lines",
        type=positive_int,
        default=200_000,
        metavar="N",
        help="lines sampled for training",
    )
    tt.add_argument(
        "--text-field", default="text", metavar="NAME", help="the text's field in .jsonl records"
    )
    tt.add_argument("--out", required=True, metavar="FILE", help="the .model file to write")
    tt.set_defaults(fn=cmd_tokenizer_train)
    return p


def _quiet_libraries() -> None:
    """Keep orbax's and jax's absl log lines away from users: warnings on every read, and the
    tracebacks orbax's save threads log before the failure reaches llmjax, which reports it in
    one line."""
    import logging

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.FATAL)
    except ImportError:
        pass
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["generate"]:  # the inference package owns its flags
        from llmjax.inference.cli import main as generate_main

        return generate_main(argv[1:])
    if argv[:1] == ["plan"]:  # its own parser: `llmjax plan --help` lists the planner's flags
        from llmjax.sharding.planner import main as plan_main

        return plan_main(argv[1:])
    args = parser().parse_args(argv)
    return args.fn(args)


def main(argv=None) -> int:
    """Run one command; bad input of any kind ends in one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = (
        " ".join(["llmjax", *argv[:1]]) if argv[:1] and not argv[0].startswith("-") else "llmjax"
    )
    _quiet_libraries()
    from llmjax.errors import LlmjaxError, one_line

    try:
        return _dispatch(argv)
    except SystemExit as e:  # argparse's usage errors (2) and --help (0): a code, as for the rest
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        raise
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from llmjax.train import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            print(f"{command}: training diverged: {one_line(e)}", file=sys.stderr)
            return 3
        if isinstance(e, LlmjaxError | OSError):
            print(f"{command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
