"""``llmjax`` command line: pretrain, eval, generate, export, plot, tokenizer train."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

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
        "data.paths": ",".join(args.data) if args.data else None,
        "loop.steps": args.steps,
        "data.batch_size": args.batch_size,
        "data.seq_len": args.seq_len,
        "loop.save_every": args.save_every,
        "loop.log_every": args.log_every,
        "loop.mesh": args.mesh,
        "data.tokenizer": args.tokenizer,
    }
    sets = [f"{k}={v}" for k, v in flags.items() if v is not None] + sets
    for assignment in sets:
        cfg = override(cfg, assignment)
    return cfg


def cmd_pretrain(args) -> int:
    import llmjax.distributed

    llmjax.distributed.initialize()  # a no-op for one process; automatic on Cloud TPU
    from llmjax.recipes import pretrain

    cfg = build_pretrain_config(args)
    out = Path(args.out)
    result = pretrain.run(cfg, out)
    if result.stopped != "done":
        print(f"stopped at step {result.step}; run the same command to resume", file=sys.stderr)
        return 128 + (result.signum or 15)  # the shell's convention for "killed by signal"
    return 0


# --- using a trained run ----------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    import jax

    from llmjax.checkpoint.load import load_run
    from llmjax.data import PackedRows, read_documents, resolve_paths, tokenize_documents
    from llmjax.train import evaluate, make_eval_step, next_token_loss

    run = load_run(args.ckpt)
    model, params, meta, tok, step_dir = (
        run.model,
        run.params,
        run.meta,
        run.tokenizer,
        run.step_dir,
    )
    seq_len = args.seq_len or meta["config"]["data"]["seq_len"]
    docs = read_documents(resolve_paths(args.data), meta["config"]["data"]["text_field"])
    rows = PackedRows(tokenize_documents(docs, tok), seq_len)
    loss = evaluate(
        jax.jit(make_eval_step(next_token_loss(model))),
        params,
        rows,
        args.batch_size,
        args.max_batches,
    )
    print(
        f"{step_dir}: loss {loss:.4f} perplexity {math.exp(min(loss, 700)):.3f} "
        f"over {min(len(rows), args.batch_size * args.max_batches)} sequences of {seq_len}"
    )
    return 0


def cmd_export(args) -> int:
    import shutil

    import llmjax
    from llmjax.checkpoint.load import load_run

    run = load_run(args.ckpt)
    model, params, tok, step_dir = run.model, run.params, run.tokenizer, run.step_dir
    llmjax.to_hf(model, params, args.out)
    shutil.copy(tok.path, Path(args.out) / "tokenizer.model")
    print(f"wrote {args.out} from {step_dir}")
    return 0


def cmd_plot(args) -> int:
    from llmjax.train.plot import plot_run

    out = plot_run(args.dir, args.out)
    print(f"wrote {out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from llmjax.data import TokenizerConfig, read_documents, resolve_paths
    from llmjax.data.tokenizer import Tokenizer, training_lines

    cfg = TokenizerConfig(
        vocab_size=args.vocab_size, model_type=args.model_type, max_lines=args.max_lines
    )
    docs = read_documents(resolve_paths(args.data), args.text_field)
    tok = Tokenizer.train(training_lines((d.text for d in docs), cfg.max_lines, cfg.seed), cfg)
    tok.save(args.out)
    print(f"wrote {args.out}: {cfg.model_type}, {tok.vocab_size} pieces")
    return 0


# --- parser ---------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmjax", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    pt = sub.add_parser("pretrain", help="train a model from scratch (resumes from --out)")
    pt.add_argument("--recipe", default="default", help="a recipe in recipes/pretrain.py")
    pt.add_argument("--preset", help="replace the recipe's model by this preset")
    pt.add_argument("--data", nargs="+", help="files, directories or globs (.txt, .jsonl, .py)")
    pt.add_argument("--tokenizer", help="an existing SentencePiece .model (default: train one)")
    pt.add_argument("--out", default="runs/pretrain", help="run directory (resumes if present)")
    pt.add_argument("--steps", type=int)
    pt.add_argument("--batch-size", type=int)
    pt.add_argument("--seq-len", type=int)
    pt.add_argument("--save-every", type=int)
    pt.add_argument("--log-every", type=int)
    pt.add_argument("--mesh", help="mesh axis sizes, e.g. data=2,fsdp=-1")
    pt.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config field, e.g. optim.lr=1e-3 (repeatable)",
    )
    pt.set_defaults(fn=cmd_pretrain)

    ev = sub.add_parser("eval", help="held-out loss and perplexity of a checkpoint")
    ev.add_argument("--ckpt", required=True)
    ev.add_argument("--data", nargs="+", required=True)
    ev.add_argument("--seq-len", type=int)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-batches", type=int, default=50)
    ev.set_defaults(fn=cmd_eval)

    ge = sub.add_parser(
        "generate", help="sample a continuation (see llmjax generate --help)", add_help=False
    )
    ge.set_defaults(fn=None)

    ex = sub.add_parser("export", help="write a Hugging Face directory from a checkpoint")
    ex.add_argument("--ckpt", required=True)
    ex.add_argument("--out", required=True)
    ex.set_defaults(fn=cmd_export)

    pl = sub.add_parser("plot", help="write a loss-curve PNG of a run")
    pl.add_argument("dir")
    pl.add_argument("--out", help="PNG path (default: DIR/loss.png)")
    pl.set_defaults(fn=cmd_plot)

    pn = sub.add_parser("plan", help="memory per device of a training step", add_help=False)
    pn.set_defaults(fn=None)

    tk = sub.add_parser("tokenizer", help="tokenizer tools")
    tks = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tks.add_parser("train", help="train a SentencePiece tokenizer")
    tt.add_argument("--data", nargs="+", required=True)
    tt.add_argument("--vocab-size", type=int, default=1024)
    tt.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    tt.add_argument("--max-lines", type=int, default=200_000)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--out", required=True)
    tt.set_defaults(fn=cmd_tokenizer_train)
    return p


def _quiet_libraries() -> None:
    """Keep orbax's and jax's absl log lines (warnings on every read) away from users."""
    import logging

    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)
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
