"""Decoding strategies built on ``generate``: best-of-N, self-consistency and CoT-decoding."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.errors import InputError
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
    score: Callable[[list[int], list[float]], float] | None = None,
    reward_model=None,
    temperature: float = 1.0,
    **sampling,
) -> BestOfN:
    """Draw ``n`` samples of one prompt in a single batch; keep the one rated highest.

    ``score(tokens, logprobs)`` sees each sample's tokens and the model's log-probabilities of
    them (a verifier, or by default the mean log-probability). A ``reward_model``
    (``llmjax.inference.RewardModel``) instead scores all samples in one call, each as prompt +
    sample; a sample that ended on a stop token keeps it, as the completions reward models are
    trained on end with eos. Give ``score`` or ``reward_model``, not both.
    """
    if reward_model is not None and score is not None:
        raise InputError(
            "best_of_n takes score or reward_model, not both; drop score= to rate the samples "
            "by the reward model, or call the reward model inside your score function"
        )
    if reward_model is not None and not callable(getattr(reward_model, "score", None)):
        raise InputError(
            f"reward_model must be a RewardModel, got a {type(reward_model).__name__}; load one "
            "with llmjax.load_reward_model(path)"
        )
    prompt = validate.one_prompt(prompt, model.config.vocab_size)
    validate.settings(n=n)
    if reward_model is None:
        out = generate(model, params, [prompt] * n, temperature=temperature, **sampling)
        score = score or mean_logprob
        scores = [float(score(t, lp)) for t, lp in zip(out.tokens, out.logprobs, strict=True)]
    else:
        out, ends = _generate_with_stops(model, params, [prompt] * n, temperature, sampling)
        sequences = [prompt + t + end for t, end in zip(out.tokens, ends, strict=True)]
        scores = [float(s) for s in reward_model.score(sequences)]
    best = int(np.argmax(scores))
    return BestOfN(out.tokens[best], scores[best], scores, out)


def _generate_with_stops(model, params, prompts, temperature, sampling):
    """``generate``'s result and, per sample, ``[the stop token that ended it]`` or ``[]``.

    ``GenerationResult`` leaves the stop token out; with a single stop id it is known, otherwise
    the step callback sees it as the token a row drew when it finished.
    """
    given = sampling.get("stop_tokens")
    stops = set(validate.token_ids("stop_tokens", () if given is None else given, None))
    if len(stops) <= 1:
        out = generate(model, params, prompts, temperature=temperature, **sampling)
        return out, [[min(stops)] if s else [] for s in out.stopped]
    sampling = dict(sampling)
    theirs = sampling.pop("callback", None)
    ended: dict[int, int] = {}

    def record(step, tokens, emitted):
        for b in np.flatnonzero(~np.asarray(emitted)):
            ended.setdefault(int(b), int(tokens[b]))
        if theirs is not None:
            theirs(step, tokens, emitted)

    out = generate(model, params, prompts, temperature=temperature, callback=record, **sampling)
    return out, [[ended[b]] if s else [] for b, s in enumerate(out.stopped)]


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
