"""Sampling as a pure function of arrays: ``rollout`` runs inside ``jax.jit``, a loss or a cond.

``generate`` checks its prompts in Python and returns Python lists, so it cannot run inside a
jitted training step. On-policy distillation (the student samples continuations every step and a
teacher scores them) and reinforcement learning need the same sampler there. ``rollout`` is that
sampler without the host: it calls ``generate``'s own prefill and decode loop
(``llmjax.inference.sampler``), so for the same prompts, settings and ``key=jax.random.key(seed)``
it draws the same tokens as ``generate(..., seed=seed)``, with the same log-probabilities.

``continuation_batch`` lays prompts and their rollout out as the training batch the library's
losses take (``llmjax.data.packing``'s keys), with the loss on the completion tokens only.

Static arguments: ``max_new``, ``sampling``'s structure (greedy or not, penalties or not; its
values travel as arrays), ``stop_ids`` and ``masked``. They and the shapes are checked in Python
when the call is traced; array values (prompt ids, lengths) cannot be checked under a trace and
are the caller's to get right. Cost: each new (B, L, max_new, sampling mode, masked, number of
stop ids) compiles the sampler again, decode loop included, so keep them fixed across training
steps. The loop still ends as soon as every row has stopped.

Gradients: decoding is a ``while_loop``, which reverse-mode autodiff cannot go through. Inside a
function given to ``jax.grad`` pass ``jax.lax.stop_gradient(params)``; gradients then flow only
through whatever scores the sampled tokens (e.g. the model applied to ``continuation_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from llmjax.inference import validate
from llmjax.inference.processors import SamplingConfig
from llmjax.inference.sampler import PAD_ID, decode_loop, for_decoding, prefill, stop_array

SAMPLE = SamplingConfig(temperature=1.0)  # the model's own distribution: what on-policy trains on


@struct.dataclass
class Rollout:
    """Continuations of a batch of prompts, as fixed-shape arrays (N is ``max_new``)."""

    tokens_BN: jax.Array  # int32; the stop token, when drawn, is kept at lengths_B; PAD_ID after
    logprobs_BN: jax.Array  # float32; the model's own (temperature 1, no processors); 0 at PAD_ID
    lengths_B: jax.Array  # int32; tokens before any stop token, as GenerationResult.lengths
    stopped_B: jax.Array  # bool; a stop token ended the row

    @property
    def completion_mask_BN(self) -> jax.Array:
        """Bool: the tokens of each completion, its stop token included (a student learns to stop)."""
        end_B = self.lengths_B + self.stopped_B.astype(jnp.int32)
        return jnp.arange(self.tokens_BN.shape[1])[None] < end_B[:, None]


def rollout(
    model,
    params,
    tokens_BL,
    lengths_B,
    key,
    *,
    max_new: int,
    sampling: SamplingConfig = SAMPLE,
    stop_ids: Sequence[int] = (),
    masked: bool | None = None,
) -> Rollout:
    """Continue each prompt by up to ``max_new`` tokens, traceably.

    ``tokens_BL`` int ``[B, L]``: prompts right-padded (any id after a prompt's end is ignored);
    ``lengths_B`` int ``[B]``: each prompt's length in ``[1, L]``; ``key``: a ``jax.random.key``.
    A row ends at its first id in ``stop_ids`` or after ``max_new`` tokens. ``masked=None`` (or
    True) allows prompts of different lengths; ``masked=False`` skips the attention mask (faster,
    and lets ``attention_impl="pallas"`` use its decode kernel on global layers) but is only
    correct when every length equals L, which cannot be checked under a trace.
    """
    cfg = model.config
    _check(cfg, tokens_BL, lengths_B, max_new, sampling)
    stops = validate.token_ids("stop_ids", stop_ids, cfg.vocab_size)
    mode = sampling.mode
    model, params = for_decoding(model, params)
    # generate's own two jitted calls: inlined into the caller's jit; called eagerly they reuse
    # generate's compiled programs (the donated state is prefill's output, never the caller's).
    state = prefill(
        model,
        params,
        jnp.asarray(tokens_BL, jnp.int32),
        jnp.asarray(lengths_B, jnp.int32),
        key,
        sampling.params(cfg.vocab_size),
        stop_array(stops),  # traced: another stop set of the same size reuses the compiled loop
        mode=mode,
        max_new=int(max_new),  # a numpy int would be another static key
        masked=masked is not False,
    )
    state = decode_loop(model, params, state, mode=mode)
    return Rollout(state.out_BN, state.logp_BN, state.length_B, state.stopped_B)


def _check(cfg, tokens_BL, lengths_B, max_new, sampling) -> None:
    """The static checks: argument types, shapes and the cache the model can index."""
    validate.integer("max_new", max_new)
    if not isinstance(sampling, SamplingConfig):
        validate.fail("sampling", sampling, "must be a SamplingConfig(temperature=..., ...)")
    shape, dtype = jnp.shape(tokens_BL), jnp.result_type(tokens_BL)
    if len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer) or 0 in shape:
        given = validate.Described(f"{dtype}{list(shape)} array")
        fail = "must be a non-empty int array [batch, length] of right-padded prompts"
        validate.fail("tokens_BL", given, fail)
    B, L = shape
    if jnp.shape(lengths_B) != (B,) or not jnp.issubdtype(jnp.result_type(lengths_B), jnp.integer):
        given = validate.Described(f"{jnp.result_type(lengths_B)}{list(jnp.shape(lengths_B))}")
        validate.fail("lengths_B", given, f"must be an int array [{B}]: each prompt's length")
    # The last token drawn is never fed back, so the positions used stop at L + max_new - 2.
    if cfg.position == "learned" and L + max_new - 1 > cfg.max_seq_len:
        validate.fail(
            "max_new",
            max_new,
            f"prompt length {L} + max_new needs {L + max_new - 1} positions, beyond max_seq_len="
            f"{cfg.max_seq_len} of {cfg.name!r} (learned position table); lower max_new or "
            "shorten the prompts",
        )


def continuation_batch(prompt_BL, prompt_lengths_B, r: Rollout, seq_len: int) -> dict:
    """Prompts and their completions as a training batch of ``seq_len`` slots per row.

    Row b holds the sequence ``prompt_b[:len_b] + completion_b`` (the stop token included) from
    slot 0, then padding: ``tokens``, ``targets`` (the token at t + 1), ``positions``,
    ``segment_ids`` (1 for the sequence, 0 for padding), int32 ``[B, seq_len]``, and float32
    ``loss_mask``, 1 exactly where the target is a completion token. This is
    ``llmjax.data.sft``'s padded layout, except that a sequence of ``seq_len + 1`` tokens fills
    the row with every target scored (as packed rows do). A longer sequence keeps its first
    ``seq_len + 1`` tokens: the end of the completion is dropped, and a prompt that long leaves
    no target to score. Pure ``jnp``: works under ``jax.jit`` with traced lengths.
    """
    validate.integer("seq_len", seq_len)
    N = r.tokens_BN.shape[1]
    L = jnp.shape(prompt_BL)[1]
    len_B1 = jnp.asarray(prompt_lengths_B, jnp.int32)[:, None]
    end_B1 = len_B1 + r.lengths_B[:, None] + r.stopped_B[:, None].astype(jnp.int32)
    j = jnp.arange(seq_len + 1, dtype=jnp.int32)[None]  # slots of the sequence, one extra target
    from_prompt = j < len_B1
    in_seq = j < end_B1
    B = len_B1.shape[0]
    at_prompt = jnp.broadcast_to(jnp.clip(j, 0, L - 1), (B, seq_len + 1))
    prompt = jnp.take_along_axis(jnp.asarray(prompt_BL, jnp.int32), at_prompt, 1)
    completion = jnp.take_along_axis(r.tokens_BN, jnp.clip(j - len_B1, 0, N - 1), 1)
    seq = jnp.where(from_prompt, prompt, jnp.where(in_seq, completion, PAD_ID))
    real = in_seq[:, :-1]
    return {
        "tokens": seq[:, :-1],
        "targets": seq[:, 1:],
        "positions": jnp.where(real, j[:, :-1], 0),
        "segment_ids": real.astype(jnp.int32),
        "loss_mask": (in_seq & ~from_prompt)[:, 1:].astype(jnp.float32),
    }
