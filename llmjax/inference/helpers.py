"""Decoding strategies built on ``generate``: best-of-N, self-consistency and CoT-decoding."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.inference import validate
from llmjax.inference.sampler import GenerationResult, generate


def mean_logprob(tokens: list[int], logprobs: list[float]) -> float:
    """Length-normalised log-likelihood: the default score of ``best_of_n``."""
    return float(np.mean(logprobs)) if logprobs else float("-inf")


@dataclasses.dataclass(frozen=True)
class BestOfN:
    tokens: list[int]
    score: float
    scores: list[float]
    samples: GenerationResult


def best_of_n(
    model,
    params,
    prompt: Sequence[int],
    n: int,
    *,
    score: Callable[[list[int], list[float]], float] = mean_logprob,
    temperature: float = 1.0,
    **sampling,
) -> BestOfN:
    """Draw ``n`` samples of one prompt in a single batch; keep the one ``score`` rates highest.

    ``score(tokens, logprobs)`` sees each sample's tokens and the model's log-probabilities of
    them (e.g. a reward model, a verifier, or the default mean log-probability).
    """
    prompt = validate.one_prompt(prompt, model.config.vocab_size)
    validate.settings(n=n)
    out = generate(model, params, [prompt] * n, temperature=temperature, **sampling)
    scores = [float(score(t, lp)) for t, lp in zip(out.tokens, out.logprobs, strict=True)]
    best = int(np.argmax(scores))
    return BestOfN(out.tokens[best], scores[best], scores, out)


@dataclasses.dataclass(frozen=True)
class Vote:
    answer: Hashable | None
    votes: collections.Counter
    samples: GenerationResult


def self_consistency(
    model,
    params,
    prompt: Sequence[int],
    n: int,
    extract_answer: Callable[[list[int]], Hashable | None],
    *,
    temperature: float = 0.7,
    **sampling,
) -> Vote:
    """Majority vote over the answers ``extract_answer`` finds in ``n`` sampled continuations.

    Samples without an answer (``None``) do not vote; ties go to the answer seen first.
    """
    prompt = validate.one_prompt(prompt, model.config.vocab_size)
    validate.settings(n=n)
    out = generate(model, params, [prompt] * n, temperature=temperature, **sampling)
    answers = [extract_answer(t) for t in out.tokens]
    votes = collections.Counter(a for a in answers if a is not None)
    answer = max(votes, key=lambda a: (votes[a], -answers.index(a))) if votes else None
    return Vote(answer, votes, out)


@dataclasses.dataclass(frozen=True)
class CoTBranch:
    tokens: list[int]  # the branch's first token, then its greedy continuation
    confidence: float  # mean p(top-1) - p(top-2) over the answer tokens
    answer_span: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class CoTResult:
    best: CoTBranch
    branches: list[CoTBranch]


def cot_decode(
    model,
    params,
    prompt: Sequence[int],
    *,
    k: int = 10,
    max_new_tokens: int,
    answer_span: Callable[[list[int]], tuple[int, int] | None] | None = None,
    stop_tokens: Sequence[int] = (),
) -> CoTResult:
    """CoT-decoding (Wang & Zhou, 2024): branch on the ``k`` most likely first tokens, continue
    each greedily, and choose the branch whose answer the model is most confident about.

    Confidence is the mean, over the answer tokens, of the margin between the top-1 and top-2
    probabilities of the distribution each token was chosen from. ``answer_span(tokens)`` gives
    ``(start, end)`` of the answer within a branch's tokens (None: the branch has no answer and
    gets confidence -inf); by default the whole branch is the answer.
    """
    vocab_size = model.config.vocab_size
    prompt = validate.one_prompt(prompt, vocab_size)
    validate.settings(max_new_tokens=max_new_tokens)
    validate.integer("k", k, 1, vocab_size + 1)
    validate.token_ids("stop_tokens", stop_tokens, vocab_size)
    first = model.apply(params, jnp.asarray([prompt], jnp.int32))[0, -1]
    top = [int(t) for t in jax.lax.top_k(first, k)[1]]
    rest = generate(
        model,
        params,
        [prompt + [t] for t in top],
        max_new_tokens=max(max_new_tokens - 1, 1),
        stop_tokens=stop_tokens,
    )
    branches = []
    for t, cont in zip(top, rest.tokens, strict=True):
        toks = ([t] + cont)[:max_new_tokens]
        seq = jnp.asarray([prompt + toks], jnp.int32)
        probs = jax.nn.softmax(model.apply(params, seq)[0, len(prompt) - 1 : -1], axis=-1)
        top2 = np.asarray(jax.lax.top_k(probs, 2)[0])  # [len(toks), 2]
        span = (0, len(toks)) if answer_span is None else answer_span(toks)
        if span is None or span[1] <= span[0]:
            conf, span = float("-inf"), (0, 0)
        else:
            conf = float(np.mean(top2[span[0] : span[1], 0] - top2[span[0] : span[1], 1]))
        branches.append(CoTBranch(toks, conf, tuple(span)))
    best = max(range(len(branches)), key=lambda i: branches[i].confidence)
    return CoTResult(branches[best], branches)
