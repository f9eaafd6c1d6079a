"""Pretraining recipes: each a function returning one complete ``TrainConfig``.

A recipe module is configs, a loss and data: here next-token cross entropy over packed documents
(optionally with z-loss), assembled into a ``Task`` by ``task``; everything else (optimizer,
checkpoints, metrics, evaluation) is the shared loop in ``llmjax.train``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path

import llmjax
import llmjax.distributed
from llmjax.data import Data, DataConfig, TokenizerConfig, build_data, eval_batches
from llmjax.errors import DataError, UnknownName
from llmjax.inference import generate
from llmjax.train import (
    LoopConfig,
    OptimizerConfig,
    Task,
    TrainConfig,
    TrainResult,
    next_token_loss,
    rundir,
    train,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where a checkout of the project keeps its copy; anyone else downloads it and passes --data.
TINY_SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def default() -> TrainConfig:
    """A small Llama 3 on the interpreter's own standard library: runs anywhere, no download.

    Sized to finish in a few minutes on a 2-core CPU with the loss clearly falling.
    """
    model = llmjax.presets.get("llama3-tiny").replace(
        name="llama3-stdlib",
        vocab_size=1024,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        mlp_dim=384,
        max_seq_len=256,
        # On a CPU, recomputing each layer in the backward pass is faster for this model than
        # keeping its activations: a scan stacks what it keeps, and XLA:CPU reads those stacks
        # slowly (docs/design.md, "Layers unrolled or scanned").
        remat="full",
    )
    return TrainConfig(
        name="default",
        model=model,
        data=DataConfig(seq_len=256, batch_size=8, tokenizer_config=TokenizerConfig(1024)),
        optim=OptimizerConfig(lr=3e-3, warmup_steps=30, schedule="cosine"),
        loop=LoopConfig(steps=300, log_every=10, eval_every=100, save_every=100),
    )


def tiny_shakespeare() -> TrainConfig:
    """The same model on tinyshakespeare.txt: give it with ``--data PATH`` (nothing downloads)."""
    cfg = default()
    return dataclasses.replace(
        cfg,
        name="tiny-shakespeare",
        data=dataclasses.replace(cfg.data, paths=(str(TINY_SHAKESPEARE),)),
    )


def llama3_1b() -> TrainConfig:
    """Llama 3.2 1B from scratch: the shape of a real run (give ``--data`` and a mesh)."""
    model = llmjax.presets.get("llama3.2-1b").replace(dtype="bfloat16", remat="dots")
    return TrainConfig(
        name="llama3.2-1b",
        model=model,
        data=DataConfig(
            seq_len=2048,
            batch_size=256,
            tokenizer_config=TokenizerConfig(32000, max_lines=2_000_000),
        ),
        optim=OptimizerConfig(lr=3e-4, warmup_steps=2000, schedule="cosine", weight_decay=0.1),
        loop=LoopConfig(
            steps=100_000,
            grad_accum=8,
            z_loss=1e-4,
            log_every=10,
            eval_every=1000,
            save_every=1000,
            eval_batches=32,
        ),
    )


RECIPES = {"default": default, "tiny-shakespeare": tiny_shakespeare, "llama3.2-1b": llama3_1b}


def get(name: str) -> TrainConfig:
    if name not in RECIPES:
        near = difflib.get_close_matches(name, list(RECIPES), n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        raise UnknownName(f"unknown recipe {name!r}; {hint}recipes: {', '.join(RECIPES)}")
    return RECIPES[name]()


def check_data(cfg: TrainConfig) -> None:
    """Refuse a recipe whose text is not on this machine, saying how to provide it."""
    if cfg.data.paths == (str(TINY_SHAKESPEARE),) and not TINY_SHAKESPEARE.is_file():
        raise DataError(
            "the tiny-shakespeare recipe needs the text: download tinyshakespeare.txt and pass "
            "--data PATH"
        )


def with_preset(cfg: TrainConfig, preset: str) -> TrainConfig:
    """``cfg`` with another model preset; the tokenizer and length shrink to fit that model."""
    model = llmjax.presets.get(preset)
    tok = cfg.data.tokenizer_config
    data = dataclasses.replace(
        cfg.data,
        seq_len=min(cfg.data.seq_len, model.max_seq_len),
        tokenizer_config=dataclasses.replace(tok, vocab_size=min(tok.vocab_size, model.vocab_size)),
    )
    return dataclasses.replace(cfg, model=model, data=data)


def task(cfg: TrainConfig, model, data: Data) -> Task:
    """Pretraining: every parameter from ``model.init``, next-token loss over packed documents
    (plus ``loop.z_loss``), held-out perplexity."""
    return Task(
        params=model.init,
        axes=model.param_axes(),
        loss=next_token_loss(model, cfg.loop.z_loss, chunk=cfg.loop.ce_chunk),
        eval_loss=next_token_loss(model, chunk=cfg.loop.ce_chunk),
        train=data.train,
        heldout=lambda batch_size, n: eval_batches(data.heldout, batch_size, n),
        model=cfg.model,
        identity={"tokenizer_sha256": data.tokenizer.sha256, "data_fingerprint": data.fingerprint},
    )


def completed(cfg: TrainConfig, out_dir) -> TrainResult | None:
    """The run in ``out_dir`` when it already reached ``loop.steps`` with this model, else None.

    Read from the newest complete checkpoint's metadata and its files' sizes alone, so finding
    out takes a second: nothing is built, restored, compiled or sampled. A checkpoint of another
    model, or one whose metadata cannot be read, is left to the loop, which names the difference
    or sets it aside.
    """
    from llmjax.checkpoint import CheckpointError, integrity, read_meta, resolve_checkpoint
    from llmjax.train.loop import model_differences

    try:
        newest = resolve_checkpoint(Path(out_dir) / "checkpoints")
    except CheckpointError:  # no run there yet
        return None
    if int(newest.name) < cfg.loop.steps:
        return None
    try:
        meta = read_meta(newest)
        if integrity.verify_files(newest, contents=False):
            return None  # a file is missing or truncated: the loop sets the step aside
    except FileNotFoundError:  # no manifest to check against: the metadata must do
        pass
    except Exception:  # whatever is wrong with it, the loop's restore reports it
        return None
    if model_differences(cfg, meta):
        return None
    step = int(meta["step"])
    return TrainResult(
        step, {}, eval_loss=meta.get("eval_loss"), stopped="complete", resumed_from=step
    )


def loss_summary(losses: dict[int, float]) -> str:
    """The training loss at the start and end of this process's steps, each a mean over a window.

    One step's loss is a noisy sample of one batch; a mean over up to ten steps says which way
    the run went.
    """
    steps = sorted(losses)
    k = max(1, min(10, len(steps) // 2))

    def window(part):
        mean = sum(losses[s] for s in part) / len(part)
        where = f"step {part[0]}" if len(part) == 1 else f"mean of steps {part[0]}-{part[-1]}"
        return f"({where}) {mean:.4f}"

    if len(steps) == 1:
        return f"training loss {window(steps)}"
    return f"training loss {window(steps[:k])} -> {window(steps[-k:])}"


def run(cfg: TrainConfig, out_dir, log=print):
    """Train (or resume) ``cfg`` in ``out_dir``; print the held-out perplexity and a sample.

    A run already at ``loop.steps`` says so and returns at once (``stopped == "complete"``,
    with an empty ``state``).
    """
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    check_data(cfg)
    with rundir.hold(out_dir):  # a second run on out_dir is refused before it builds anything
        return _run(cfg, out_dir, log)


def _run(cfg: TrainConfig, out_dir, log) -> TrainResult:
    done = completed(cfg, out_dir)
    if done is not None:
        where = (
            f"complete at step {done.step} (loop.steps={cfg.loop.steps})"
            if done.step == cfg.loop.steps
            else f"at step {done.step}, past loop.steps={cfg.loop.steps}"
        )
        log(f"{out_dir} is {where}; raise --steps to train further, or use a new --out")
        return done
    model = llmjax.build(cfg.model)
    log(f"recipe {cfg.name}: {model}")
    # Process 0 trains the tokenizer and writes the token caches; the others then read them.
    data = llmjax.distributed.main_process_first(
        lambda: build_data(cfg.data, out_dir, cfg.model.vocab_size)
    )
    log(f"data: {data.description}; tokenizer: {data.tokenizer.vocab_size} pieces")
    result = train(cfg, task(cfg, model, data), out_dir, log=log)
    if result.losses:
        log(loss_summary(result.losses))
    if result.eval_loss is not None:
        log(f"held-out loss {result.eval_loss:.4f}, perplexity {math.exp(result.eval_loss):.2f}")
    if cfg.loop.sample_tokens and result.stopped == "done":
        tok = data.tokenizer
        # The opening of the held-out split: a prompt in the corpus's own style, never trained on.
        prompt = [int(i) for i in data.heldout.stream.tokens[:16]]
        ids = generate(
            model, result.state["params"], [prompt], max_new_tokens=cfg.loop.sample_tokens,
            temperature=0.8, top_k=40, seed=cfg.loop.seed, stop_tokens=(tok.eos_id,),
            forbidden_tokens=range(tok.vocab_size, cfg.model.vocab_size),  # padded vocabulary
        ).tokens[0]  # fmt: skip
        log("sample:\n" + tok.decode(prompt[1:] + ids))
    return result
