"""A reward model for inference: a decoder, its scalar head and its tokenizer, scoring token ids.

    rm = load_reward_model("runs/reward")            # or a ...ForSequenceClassification directory
    scores_N = rm.score([[1, 17, 42, 3], [1, 9, 3]])  # float32 [N], one per sequence

Each sequence is scored at its last token, as ``llmjax.scalar_head.sequence_scores`` scores a
row: reward models are trained on prompt + completion with the completion's eos, so give the eos
when the completion has one. Sequences are batched by length (powers of two) under one jitted
function; padding never changes a score.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from llmjax.errors import InputError
from llmjax.inference import validate
from llmjax.scalar_head import check_head, sequence_scores

PAD_ID = 0  # fills padding slots; the attention mask hides them, so any id would do
MIN_BUCKET = 16  # shorter sequences share one compiled length


@functools.partial(jax.jit, static_argnames=("model",))
def _score_batch(model, params, head, tokens_BT, mask_BT, last_B):
    return sequence_scores(
        model, params, head, tokens_BT, attention_mask=mask_BT, last_index_B=last_B
    )


def _bucket(n: int, cap: int | None) -> int:
    """The padded length of an ``n``-token sequence: a power of two, at most ``cap``."""
    length = max(MIN_BUCKET, 1 << (n - 1).bit_length())
    return length if cap is None else min(length, cap)


@dataclasses.dataclass(frozen=True)
class RewardModel:
    """A decoder ``model`` with its ``params``, the scalar ``head`` ``{"score": [D]}`` and the
    ``tokenizer`` its scores assume (None when unknown, e.g. a directory without one)."""

    model: object
    params: dict
    head: dict
    tokenizer: object = None

    def __post_init__(self):
        check_head(self.model, self.head)

    def score(self, sequences: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
        """float32 ``[N]``: each sequence of token ids scored at its last token.

        Sequences are right-padded to a power-of-two length and run in batches of a fixed size
        (``batch_size``, or the next power of two above N when that is smaller), so repeated calls
        compile once per length bucket; a score does not depend on the batch it ran in.
        """
        cfg = self.model.config
        batch_size = validate.integer("batch_size", batch_size)
        if isinstance(sequences, np.ndarray | jax.Array) and np.ndim(sequences) == 2:
            sequences = list(np.asarray(sequences))
        if isinstance(sequences, str | bytes) or not isinstance(sequences, Sequence):
            validate.fail("sequences", sequences, "must be a list of token-id lists")
        seqs = [
            validate.token_ids(f"sequences[{i}]", s, cfg.vocab_size)
            for i, s in enumerate(sequences)
        ]
        cap = cfg.max_seq_len if cfg.position == "learned" else None
        for i, s in enumerate(seqs):
            if not s:
                validate.fail(f"sequences[{i}]", s, "is empty; a sequence needs at least one token")
            if cap is not None and len(s) > cap:
                validate.fail(
                    f"sequences[{i}]",
                    validate.Described(f"{len(s)} tokens"),
                    f"is longer than max_seq_len={cap} of {cfg.name!r} (learned positions); "
                    "shorten it",
                )
        scores = np.zeros(len(seqs), np.float32)
        if not seqs:
            return scores
        B = min(batch_size, 1 << (len(seqs) - 1).bit_length())
        buckets: dict[int, list[int]] = {}
        for i in sorted(range(len(seqs)), key=lambda i: len(seqs[i])):
            buckets.setdefault(_bucket(len(seqs[i]), cap), []).append(i)
        for T, members in buckets.items():
            for start in range(0, len(members), B):
                rows = members[start : start + B]
                tokens = np.full((B, T), PAD_ID, np.int32)
                mask = np.zeros((B, T), bool)
                mask[:, 0] = True  # filler rows hold one token: a fully masked row is undefined
                last = np.zeros(B, np.int32)
                for b, i in enumerate(rows):
                    tokens[b, : len(seqs[i])] = seqs[i]
                    mask[b, : len(seqs[i])] = True
                    last[b] = len(seqs[i]) - 1
                out = _score_batch(self.model, self.params, self.head, tokens, mask, last)
                scores[rows] = np.asarray(out)[: len(rows)]
        return scores


def load_reward_model(path) -> RewardModel:
    """A ``RewardModel`` from a ``llmjax reward`` run (or one of its step directories) or a
    Hugging Face ``...ForSequenceClassification`` directory with one label (its tokenizer too,
    when the directory has ``tokenizer.json`` or ``tokenizer.model``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(
            f"reward model {str(path)!r}: no such file or directory; give a run trained with "
            "`llmjax reward` or a Hugging Face ...ForSequenceClassification directory"
        )
    if (p / "config.json").is_file():
        from llmjax.data.hf_tokenizer import open_tokenizer
        from llmjax.interop.hf import read_config
        from llmjax.interop.hf_config import CLASSIFIERS
        from llmjax.interop.hf_score import from_hf_scorer

        archs = read_config(p).get("architectures") or []
        lms = [a for a in archs if a in CLASSIFIERS.values()]
        if lms and not any(a in CLASSIFIERS for a in archs):
            raise InputError(
                f"{path} holds a {lms[0]}, a language model, not a reward model; train one on it "
                f"with `llmjax reward --base {path} --data pairs.jsonl --out DIR`, or give a "
                "...ForSequenceClassification directory"
            )
        model, params, head = from_hf_scorer(p)
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
        return RewardModel(model, params, head, open_tokenizer(p) if has_tok else None)
    from llmjax.runs import load_run

    run = load_run(p)
    head = getattr(run, "head", None)
    if head is None:
        raise InputError(
            f"{path} is a run without a reward head (a language model, not a reward model); "
            f"train one on preference pairs with `llmjax reward --base {path} --data pairs.jsonl "
            "--out DIR`, or give a ...ForSequenceClassification directory"
        )
    return RewardModel(run.model, run.params, head, run.tokenizer)


def pad_id_for_export(tokenizer, vocab_size: int) -> int:
    """The ``pad_token_id`` to write with a reward model: an id that ends no sequence, since
    transformers scores the rightmost token that is not the pad, and reward models are trained on
    completions ending with eos, which many tokenizers also use as their pad. The tokenizer's pad
    unless it is a stop id, else the first id beyond the tokenizer's vocabulary, else unk; eos
    only when none of those is free."""
    stops = {tokenizer.eos_id, *getattr(tokenizer, "stop_ids", ())}
    spare = tokenizer.vocab_size if tokenizer.vocab_size < vocab_size else None
    for candidate in (tokenizer.pad_id, spare, tokenizer.unk_id):
        if candidate is not None and candidate not in stops and 0 <= candidate < vocab_size:
            return candidate
    return tokenizer.eos_id
