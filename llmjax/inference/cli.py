"""``llmjax generate``: sample from a checkpoint or a Hugging Face directory, streaming to stdout.

    llmjax generate --ckpt runs/pretrain --prompt "To be" --temperature 0.8 --top-p 0.9
    llmjax generate --hf DIR --prompt-ids 1,5,9 --max-new-tokens 20          # no tokenizer needed
    llmjax generate --hf DIR --prompt "x" --draft SMALL_DIR --quantize int8   # speculative, int8

A Hugging Face directory's tokenizer is its SentencePiece ``tokenizer.model`` (what ``llmjax
export`` writes); without one, give the prompt as ids with ``--prompt-ids``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def load(path: str, kind: str):
    """``(model, params, tokenizer or None)`` from a run / step directory or a HF directory."""
    if kind == "ckpt":
        from llmjax.checkpoint import load_run

        run = load_run(path)
        return run.model, run.params, run.tokenizer
    import llmjax
    from llmjax.data import Tokenizer

    model, params = llmjax.from_hf(path)
    spm = Path(path) / "tokenizer.model"
    return model, params, (Tokenizer.load(spm) if spm.is_file() else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmjax generate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a training run or one of its step directories")
    src.add_argument("--hf", help="a Hugging Face model directory")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    text.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-ids", help="comma-separated stop ids (default: the tokenizer's eos)")
    p.add_argument("--draft", help="draft model directory (run or HF) for speculative decoding")
    p.add_argument("--num-draft", type=int, default=4, help="draft tokens per verification")
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization")
    p.add_argument("--group-size", type=int, default=64, help="int4 group size")
    return p


def _ids(text: str) -> list[int]:
    return [int(t) for t in text.replace(" ", "").split(",") if t]


def _source(path: str) -> str:
    return "hf" if (Path(path) / "config.json").is_file() else "ckpt"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from llmjax.inference import QuantizedModel, generate, quantize, speculative_generate

    kind, path = ("ckpt", args.ckpt) if args.ckpt else ("hf", args.hf)
    model, params, tok = load(path, kind)
    if args.prompt is not None:
        if tok is None:
            print(
                f"llmjax generate: error: {path} has no tokenizer.model; give --prompt-ids",
                file=sys.stderr,
            )
            return 2
        prompt = [tok.bos_id] + tok.encode(args.prompt)
    else:
        prompt = _ids(args.prompt_ids)
    stops = _ids(args.stop_ids) if args.stop_ids else ([tok.eos_id] if tok else [])
    if args.quantize:
        params = quantize(model, params, args.quantize, args.group_size)
        model = QuantizedModel(model)
    # A model's vocabulary is often padded beyond its tokenizer's: ids the tokenizer cannot
    # decode are never drawn.
    V = model.config.vocab_size
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
    if args.prompt is not None:
        sys.stdout.write(args.prompt)
    sys.stdout.flush()

    if args.draft:
        if args.repetition_penalty is not None:
            print("llmjax generate: error: --draft takes no --repetition-penalty", file=sys.stderr)
            return 2
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


def _show(tokens: list[int]) -> str:
    return ",".join(str(t) for t in tokens)


if __name__ == "__main__":
    sys.exit(main())
