"""``llmjax eval``: loss and perplexity of a trained run, on its own held-out split or on --data."""

from __future__ import annotations

import dataclasses
import math


def heldout_rows(meta: dict, tokenizer, seq_len: int):
    """The held-out split a run evaluated on, rebuilt from its saved data config."""
    from llmjax.data import DataConfig, DataError, PackedRows, TokenizerConfig, tokenize_documents
    from llmjax.data.pipeline import load_documents

    saved = meta["config"]["data"]
    known = {f.name for f in dataclasses.fields(DataConfig)}
    fields = {k: v for k, v in saved.items() if k in known}
    fields["paths"] = tuple(fields.get("paths", ()))
    fields["tokenizer_config"] = TokenizerConfig(**fields.get("tokenizer_config", {}))
    try:
        (_, heldout), _ = load_documents(DataConfig(**fields))
    except DataError as e:  # e.g. the training text moved, or a path saved relative elsewhere
        raise DataError(
            f"cannot rebuild the run's held-out split from its data config ({e}); "
            "pass --data PATH to evaluate on other text"
        ) from e
    return PackedRows(tokenize_documents(heldout, tokenizer), seq_len)


def cmd_eval(args) -> int:
    import jax

    from llmjax.config import ConfigError
    from llmjax.data import (
        PackedRows,
        eval_batches,
        read_documents,
        resolve_paths,
        tokenize_documents,
    )
    from llmjax.runs import load_run
    from llmjax.train import evaluate, make_eval_step, next_token_loss

    run = load_run(args.ckpt)
    if "preference" in run.meta.get("identity", {}) and not args.data:
        return _eval_preference(run, args)
    records = "path" in run.meta["config"]["data"]  # fine-tuned, or distilled on records
    if ("base" in run.meta.get("identity", {}) or records) and not args.data:
        return _eval_finetuned(run, args)
    seq_len = args.seq_len or run.meta["config"]["data"]["seq_len"]
    if seq_len > run.model.config.max_seq_len:
        raise ConfigError(
            f"--seq-len {seq_len} is beyond the model's max_seq_len="
            f"{run.model.config.max_seq_len}; pass --seq-len {run.model.config.max_seq_len} or less"
        )
    if args.data:
        docs = read_documents(resolve_paths(args.data), run.meta["config"]["data"]["text_field"])
        rows, source = PackedRows(tokenize_documents(docs, run.tokenizer), seq_len), "--data"
    else:
        rows, source = heldout_rows(run.meta, run.tokenizer, seq_len), "the run's held-out split"
    step = jax.jit(make_eval_step(next_token_loss(run.model)))
    result = evaluate(step, run.params, eval_batches(rows, args.batch_size, args.max_batches))
    print(
        f"{run.step_dir}: loss {result.loss:.4f} perplexity "
        f"{math.exp(min(result.loss, 700)):.3f} over {result.sequences} sequences of {seq_len} "
        f"tokens ({result.tokens} scored tokens) from {source}"
    )
    return 0


def _eval_finetuned(run, args) -> int:
    """A fine-tuning run on its own held-out records: loss over completion tokens, token
    accuracy and greedy exact match, as its last evaluation computed them."""
    import jax

    from llmjax.data.sft import SFTDataConfig, build_sft_data
    from llmjax.recipes.sft import exact_match
    from llmjax.train import evaluate, make_eval_step, next_token_loss

    cfg = run.meta["config"]
    data_cfg = SFTDataConfig(**{**cfg["data"], "batch_size": args.batch_size, "strict": False})
    data = build_sft_data(data_cfg, run.tokenizer, run.model.config.vocab_size)
    step = jax.jit(make_eval_step(next_token_loss(run.model, accuracy=True)))
    result = evaluate(step, run.params, data.heldout.batches(args.batch_size, args.max_batches))
    examples = data.heldout.examples[: cfg.get("exact_match_prompts", 64)]
    em = ""
    if examples:
        score = exact_match(
            run.model, run.params, run.tokenizer, examples, cfg.get("max_new_tokens", 64)
        )
        em = f", exact match {score:.3f} on {len(examples)} prompts"
    print(
        f"{run.step_dir}: loss {result.loss:.4f} perplexity {math.exp(min(result.loss, 700)):.3f} "
        f"token accuracy {result.metrics.get('mean_token_accuracy', float('nan')):.3f} over "
        f"{result.sequences} held-out rows ({result.tokens} completion tokens){em}"
    )
    return 0


def _eval_preference(run, args) -> int:
    """A DPO-family or reward run on its own held-out pairs, as its last evaluation scored them."""
    from llmjax.recipes.preference import evaluate_run

    m = evaluate_run(run, args.batch_size, args.max_batches)
    shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items() if k != "pairs")
    print(f"{run.step_dir}: {shown} over {m['pairs']} held-out pairs")
    return 0
