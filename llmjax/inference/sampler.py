"""Batched generation: one jitted prefill, then a compiled decode loop over a preallocated KV cache.

Prompts of different lengths are right-padded into one ``[B, L]`` batch and prefilled with an
attention mask; each sequence's cache length is then reset to its own prompt length, so its first
new token overwrites its padding (the mask hides slots at or beyond a sequence's length; the ring
buffers of sliding-window layers never hold padding). When all prompts have the same length no
mask is passed, which keeps the cache "unpacked" and lets ``attention_impl="pallas"`` use its
decode kernel (on global layers: sliding-window layers read their ring buffers with XLA).

The decode loop is a ``lax.while_loop`` inside one jitted call whose state (cache included) is
donated, so the cache is updated in place. It stops early once every sequence has finished. With a
``callback`` the same step runs as a Python loop of jitted calls instead, so tokens can be streamed;
both paths draw the same tokens for the same seed (step i uses ``fold_in(seed key, i)``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax.inference import validate
from llmjax.inference.processors import SamplingConfig, SamplingMode, SamplingParams, sample
from llmjax.models.model import Model
from llmjax.models.scan import scan_plan, unstack_layers

PAD_ID = 0  # written after a sequence finished; never part of a returned sequence


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """``tokens[b]``: generated ids (prompt and stop token excluded); ``logprobs[b][i]``: the model's
    own log-probability (temperature 1, no processors) of ``tokens[b][i]``; ``lengths[b]``:
    ``len(tokens[b])``; ``stopped[b]``: whether a stop token ended the sequence."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    lengths: list[int]
    stopped: list[bool]


@struct.dataclass
class DecodeState:
    cache: object
    last_B: jax.Array  # the newest token, not yet written to the cache
    step: jax.Array  # tokens emitted so far (same for every row)
    out_BN: jax.Array
    logp_BN: jax.Array
    done_B: jax.Array
    length_B: jax.Array  # emitted tokens before any stop token
    stopped_B: jax.Array
    seen_BV: jax.Array | None
    counts_BV: jax.Array | None
    key: jax.Array
    sp: SamplingParams
    stops_S: jax.Array  # stop ids, padded with -1


def pad_prompts(prompts, vocab_size: int):
    """``(tokens [B, L] int32, lengths [B] int32)`` right-padded with ``PAD_ID``; validates ids."""
    batch = validate.prompt_batch(prompts, vocab_size)
    lengths = np.asarray([len(p) for p in batch], np.int32)
    tokens = np.full((len(batch), int(lengths.max())), PAD_ID, np.int32)
    for b, p in enumerate(batch):
        tokens[b, : len(p)] = p  # every id was checked to lie in [0, vocab_size): no wrap-around
    return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation call: padded prompts, traced sampling values and stop ids."""

    tokens: np.ndarray  # [B, L] int32
    lengths: np.ndarray  # [B] int32
    sp: SamplingParams
    stops_S: jax.Array
    key: jax.Array

    @property
    def masked(self) -> bool:
        return bool(self.lengths.min() != self.lengths.max())


def prepare(
    models,
    prompts,
    sampling: SamplingConfig,
    *,
    max_new_tokens,
    stop_tokens,
    seed,
    extra_slots,
    rollback=0,
) -> Request:
    """Check every argument of a generation call, in Python, before anything is compiled.

    ``models`` will each hold a cache of ``L + max_new_tokens + extra_slots`` slots (the target
    and the draft of speculative decoding) built with ``rollback`` (see ``Model.init_cache``);
    ids are checked against the first one's vocabulary.
    """
    validate.settings(max_new_tokens=max_new_tokens, seed=seed)
    max_new_tokens = int(max_new_tokens)
    vocab_size = models[0].config.vocab_size
    tokens, lengths = pad_prompts(prompts, vocab_size)
    if stop_tokens is None:
        stop_tokens = ()
    stops = validate.token_ids("stop_tokens", stop_tokens, vocab_size)
    for m in models:
        cache_len = tokens.shape[1] + max_new_tokens + extra_slots
        validate.capacity(m, len(lengths), cache_len, max_new_tokens, rollback)
    return Request(
        tokens,
        lengths,
        sampling.params(vocab_size),
        stop_array(stops),
        jax.random.key(seed),
    )


@functools.partial(jax.jit, static_argnums=0)
def _unstacked(cfg, params):
    return unstack_layers(cfg, params)


@functools.lru_cache(maxsize=64)
def _unrolled(cfg) -> Model:  # one object per config: the jitted calls take the model as static
    return Model(cfg.replace(scan_layers=False))


def for_decoding(model, params):
    """``(model, params)`` to decode with: a scanned model unrolled, its stacks sliced once.

    With a KV cache a scanned layer runs on ``x[r]`` of its stack, which XLA:CPU copies at every
    decode step: a second pass over every weight where decoding is bound by reading them (2.2-2.4x
    slower at batch 1, docs/benchmarks.md). Slicing once per call, before the decode loop, holds
    one unrolled copy of the layers' weights for the call. Works eagerly and under a trace.
    """
    cfg = getattr(model, "config", None)
    if not isinstance(model, Model) or not scan_plan(cfg).repeats:
        return model, params  # unrolled already, or quantized (dequantized per call anyway)
    return _unrolled(cfg), _unstacked(cfg, params)


def prefill_cache(
    model, params, tokens_BL, lengths_B, cache_len: int, masked: bool, rollback: int = 0
):
    """``(logits of each prompt's last real token [B, V], cache at the prompt lengths)``.

    Lowering the lengths from L to the prompts' own needs no ``rollback``: sliding-window layers'
    ring buffers never hold the padding it drops.
    """
    cache = model.init_cache(tokens_BL.shape[0], cache_len, rollback=rollback)
    mask = (jnp.arange(tokens_BL.shape[1])[None] < lengths_B[:, None]) if masked else None
    last = (lengths_B - 1)[:, None]
    logits, cache = model.apply(
        params, tokens_BL, attention_mask=mask, cache=cache, logit_index=last
    )
    return logits[:, 0], cache.replace(length_B=lengths_B)


def stop_array(stop_tokens) -> jax.Array:
    """Stop ids as an int32 array padded with -1 (traced, so new stop ids do not recompile)."""
    stops = sorted({int(t) for t in stop_tokens})
    return jnp.asarray(stops or [-1], jnp.int32)


def _emit(state: DecodeState, logits_BV, mode: SamplingMode):
    """Draw the next token of every row from ``logits_BV`` and record it."""
    key = jax.random.fold_in(state.key, state.step)
    tok = sample(key, logits_BV, state.sp, mode, state.seen_BV, state.counts_BV)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), tok[:, None], axis=-1)[:, 0]
    live = ~state.done_B
    is_stop = jnp.isin(tok, state.stops_S) & live
    seen, counts = state.seen_BV, state.counts_BV
    if seen is not None:
        hit = jax.nn.one_hot(tok, logits_BV.shape[-1], dtype=bool) & live[:, None]
        seen, counts = seen | hit, counts + hit.astype(counts.dtype)
    return state.replace(
        last_B=tok,
        step=state.step + 1,
        out_BN=state.out_BN.at[:, state.step].set(jnp.where(live, tok, PAD_ID)),
        logp_BN=state.logp_BN.at[:, state.step].set(jnp.where(live, logp, 0.0)),
        done_B=state.done_B | is_stop,
        length_B=state.length_B + (live & ~is_stop),
        stopped_B=state.stopped_B | is_stop,
        seen_BV=seen,
        counts_BV=counts,
    )


@functools.partial(jax.jit, static_argnames=("model", "mode", "max_new", "masked"))
def prefill(model, params, tokens_BL, lengths_B, key, sp, stops_S, *, mode, max_new, masked):
    """Prefill the cache and emit the first token: the state the decode loop starts from."""
    B, L = tokens_BL.shape
    logits, cache = prefill_cache(model, params, tokens_BL, lengths_B, L + max_new - 1, masked)
    seen = counts = None
    if mode.history:
        V = model.config.vocab_size
        real = jnp.arange(L)[None] < lengths_B[:, None]
        seen = jnp.zeros((B, V), jnp.int32).at[jnp.arange(B)[:, None], tokens_BL].max(real) > 0
        counts = jnp.zeros((B, V), jnp.int32)  # frequency penalty counts generated tokens only
    state = DecodeState(
        cache=cache,
        last_B=jnp.zeros((B,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        out_BN=jnp.full((B, max_new), PAD_ID, jnp.int32),
        logp_BN=jnp.zeros((B, max_new), jnp.float32),
        done_B=jnp.zeros((B,), bool),
        length_B=jnp.zeros((B,), jnp.int32),
        stopped_B=jnp.zeros((B,), bool),
        seen_BV=seen,
        counts_BV=counts,
        key=key,
        sp=sp,
        stops_S=stops_S,
    )
    return _emit(state, logits, mode)


def _step(model, params, state: DecodeState, mode):
    logits, cache = model.apply(params, state.last_B[:, None], cache=state.cache)
    return _emit(state.replace(cache=cache), logits[:, 0], mode)


@functools.partial(jax.jit, static_argnames=("model", "mode"), donate_argnames=("state",))
def decode_step(model, params, state, *, mode):
    return _step(model, params, state, mode)


@functools.partial(jax.jit, static_argnames=("model", "mode"), donate_argnames=("state",))
def decode_loop(model, params, state, *, mode):
    """Decode until every row is done or the output buffer is full, in one compiled loop."""
    max_new = state.out_BN.shape[1]
    cond = lambda s: (s.step < max_new) & ~jnp.all(s.done_B)
    return jax.lax.while_loop(cond, lambda s: _step(model, params, s, mode), state)


def to_result(state: DecodeState) -> GenerationResult:
    out, logp = np.asarray(state.out_BN), np.asarray(state.logp_BN)
    lengths = [int(n) for n in np.asarray(state.length_B)]
    return GenerationResult(
        tokens=[out[b, :n].tolist() for b, n in enumerate(lengths)],
        logprobs=[logp[b, :n].tolist() for b, n in enumerate(lengths)],
        lengths=lengths,
        stopped=[bool(s) for s in np.asarray(state.stopped_B)],
    )


def generate(
    model,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    frequency_penalty: float | None = None,
    forbidden_tokens: Sequence[int] | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    callback: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    Processors apply in the order documented in ``llmjax.inference.processors``. A sequence ends
    at its first stop token (not included in the result) or after ``max_new_tokens`` tokens.
    ``callback(step, tokens [B], emitted [B] bool)`` is called after every step with the drawn
    tokens; ``emitted[b]`` is False for a stop token or a row that had already finished.
    ``params`` may be quantized (see ``llmjax.inference.quantize``) if ``model`` is the matching
    ``QuantizedModel``.
    """
    cfg = SamplingConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        forbidden_tokens=forbidden_tokens,
    )
    # The cache holds L + max_new_tokens - 1 slots: the last token drawn is never fed back.
    req = prepare(
        [model], prompts, cfg, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, seed=seed,
        extra_slots=-1,
    )  # fmt: skip
    mode = cfg.mode
    model, params = for_decoding(model, params)
    state = prefill(
        model,
        params,
        jnp.asarray(req.tokens),
        jnp.asarray(req.lengths),
        req.key,
        req.sp,
        req.stops_S,
        mode=mode,
        max_new=int(max_new_tokens),  # a numpy int would be another static key
        masked=req.masked,
    )
    if callback is None:
        return to_result(decode_loop(model, params, state, mode=mode))
    prev_done = np.zeros(len(req.lengths), bool)
    for step in range(int(max_new_tokens)):
        if step:
            state = decode_step(model, params, state, mode=mode)
        done = np.asarray(state.done_B)
        callback(step, np.asarray(state.last_B), ~done & ~prev_done)
        prev_done = done
        if done.all():
            break
    return to_result(state)
