"""Speculative decoding: a small draft model proposes k tokens, the target verifies them at once.

Each iteration, for every row independently:

1. The draft samples d_1..d_k autoregressively from its processed distributions q_0..q_{k-1}.
2. The target runs once on ``[last, d_1, ..., d_k]`` and yields p_0..p_k.
3. d_j is accepted with probability min(1, p_{j-1}(d_j) / q_{j-1}(d_j)), stopping at the first
   rejection. If d_{n+1} is rejected, one token is drawn from normalise(max(0, p_n - q_n)); if all
   k are accepted, a bonus token is drawn from p_k. So every iteration emits n + 1 tokens.

Why the output is distributed exactly as the target's: for one position, P(emit x) =
q(x) min(1, p(x)/q(x)) + P(reject) * max(0, p(x) - q(x)) / Z, where P(reject) = 1 - sum_y min(q(y),
p(y)) = sum_y max(0, p(y) - q(y)) = Z; the sum is min(q, p) + max(0, p - q) = p(x). Induction over
positions gives the joint distribution (Leviathan et al. 2023; Chen et al. 2023). With temperature
0 both distributions are one-hot, so the rule accepts exactly the drafts equal to the target's
argmax and the output equals greedy decoding of the target.

Rollback: both caches wrote the k + 1 fed tokens; each row's ``length_B`` is reset to keep only the
accepted ones. Rejected slots lie beyond the length, so the causal mask hides them until they are
overwritten. The caches are built with ``rollback=k``: the ring buffers of sliding-window layers
keep k entries beyond the window, so dropping up to k + 1 tokens (a finished row drops them all)
loses no key still in the window. The draft is also fed d_k (its output unused) so that both
caches stay in step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from llmjax.errors import InputError
from llmjax.inference import validate
from llmjax.inference.processors import SamplingConfig, distribution, draw
from llmjax.inference.sampler import (
    PAD_ID,
    GenerationResult,
    for_decoding,
    prefill_cache,
    prepare,
    to_result,
)


@dataclasses.dataclass(frozen=True)
class SpeculativeResult(GenerationResult):
    """A ``GenerationResult`` plus how many draft tokens were proposed and accepted."""

    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)


@struct.dataclass
class SpecState:
    tcache: object
    dcache: object
    last_B: jax.Array  # newest emitted token, not yet in either cache
    count_B: jax.Array  # tokens written to the output buffer
    out_BN: jax.Array
    logp_BN: jax.Array
    done_B: jax.Array
    length_B: jax.Array
    stopped_B: jax.Array
    key: jax.Array
    iters: jax.Array
    proposed: jax.Array
    accepted: jax.Array


def _first_stop(tokens_BN, valid_BN, stops_S):
    """Index of each row's first valid stop token, or N when there is none."""
    N = tokens_BN.shape[1]
    hit = jnp.isin(tokens_BN, stops_S) & valid_BN
    return jnp.where(hit.any(axis=1), jnp.argmax(hit, axis=1), N).astype(jnp.int32)


def _record(state, tokens_BN, logp_BN, n_new_B, stops_S, max_new):
    """Append each live row's first ``n_new_B`` tokens; finish rows at a stop token or the limit."""
    N = tokens_BN.shape[1]
    live = ~state.done_B
    write = jax.vmap(lambda buf, x, o: jax.lax.dynamic_update_slice(buf, x, (o,)))
    out = jnp.where(live[:, None], write(state.out_BN, tokens_BN, state.count_B), state.out_BN)
    lp = jnp.where(live[:, None], write(state.logp_BN, logp_BN, state.count_B), state.logp_BN)
    valid = jnp.arange(N)[None] < n_new_B[:, None]
    stop_at = _first_stop(tokens_BN, valid, stops_S)
    hit = (stop_at < N) & live
    count = jnp.where(live, state.count_B + n_new_B, state.count_B)
    length = jnp.where(hit, state.count_B + stop_at, jnp.where(live, count, state.length_B))
    length = jnp.minimum(length, max_new)
    done = state.done_B | hit | (count >= max_new)
    return state.replace(
        out_BN=out,
        logp_BN=lp,
        count_B=count,
        length_B=length,
        done_B=done,
        stopped_B=state.stopped_B | (hit & (state.count_B + stop_at < max_new)),
    )


def _iteration(target, tparams, draft, dparams, state: SpecState, sp, mode, stops_S, k, max_new):
    B = state.last_B.shape[0]
    key = jax.random.fold_in(state.key, state.iters)
    k_draft, k_accept, k_final = jax.random.split(key, 3)
    start = state.tcache.length_B
    live = ~state.done_B

    x, dcache, drafts, q_logps = state.last_B, state.dcache, [], []
    for j in range(k + 1):
        logits, dcache = draft.apply(dparams, x[:, None], cache=dcache)
        if j < k:
            lq = distribution(logits[:, 0], sp, mode)
            x = draw(jax.random.fold_in(k_draft, j), lq, mode.greedy)
            drafts.append(x)
            q_logps.append(lq)
    d_Bk = jnp.stack(drafts, axis=1)
    lq_BkV = jnp.stack(q_logps, axis=1)

    fed = jnp.concatenate([state.last_B[:, None], d_Bk], axis=1)
    tlogits, tcache = target.apply(tparams, fed, cache=state.tcache)
    V = tlogits.shape[-1]
    lp_BkV = distribution(tlogits.reshape(B * (k + 1), V), sp, mode).reshape(B, k + 1, V)

    p_d = jnp.exp(jnp.take_along_axis(lp_BkV[:, :k], d_Bk[..., None], axis=-1)[..., 0])
    q_d = jnp.exp(jnp.take_along_axis(lq_BkV, d_Bk[..., None], axis=-1)[..., 0])
    u = jax.random.uniform(k_accept, (B, k))
    accept = u * q_d < p_d  # u < p/q without dividing; q(d) > 0 because d was drawn from q
    n = jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)  # leading accepts

    p_n = jnp.exp(jnp.take_along_axis(lp_BkV, n[:, None, None], axis=1)[:, 0])
    q_all = jnp.concatenate([jnp.exp(lq_BkV), jnp.zeros((B, 1, V))], axis=1)  # q = 0: bonus
    q_n = jnp.take_along_axis(q_all, n[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_n - q_n, 0.0)
    # p == q up to rounding makes the residual vanish; a rejection is then (almost) impossible
    # and drawing from p is the right limit.
    resid = jnp.where(resid.sum(-1, keepdims=True) > 1e-12, resid, p_n)
    final = draw(k_final, jnp.log(resid), mode.greedy)

    emitted = jnp.concatenate([d_Bk, jnp.zeros((B, 1), jnp.int32)], axis=1)
    emitted = jnp.where(jnp.arange(k + 1)[None] == n[:, None], final[:, None], emitted)
    raw = jax.nn.log_softmax(tlogits, axis=-1)
    logp = jnp.take_along_axis(raw, emitted[..., None], axis=-1)[..., 0]

    keep = jnp.where(live, start + n + 1, start)  # rollback: drop rejected slots
    state = state.replace(
        tcache=tcache.replace(length_B=keep),
        dcache=dcache.replace(length_B=keep),
        last_B=jnp.where(live, final, state.last_B),
        iters=state.iters + 1,
        proposed=state.proposed + k * jnp.sum(live),
        accepted=state.accepted + jnp.sum(jnp.where(live, n, 0)),
    )
    return _record(state, emitted, logp, n + 1, stops_S, max_new)


@functools.partial(jax.jit, static_argnames=("target", "draft", "mode", "k", "max_new", "masked"))
def _run(
    target, tparams, draft, dparams, tokens, lengths, key, sp, stops_S, *, mode, k, max_new, masked
):
    B, L = tokens.shape
    cache_len = L + max_new + k
    target, tparams = for_decoding(target, tparams)
    draft, dparams = for_decoding(draft, dparams)
    tlogits, tcache = prefill_cache(target, tparams, tokens, lengths, cache_len, masked, k)
    _, dcache = prefill_cache(draft, dparams, tokens, lengths, cache_len, masked, k)
    k_first, key = jax.random.split(key)
    first = draw(k_first, distribution(tlogits, sp, mode), mode.greedy)
    first_logp = jnp.take_along_axis(jax.nn.log_softmax(tlogits), first[:, None], axis=-1)
    zeros_B = jnp.zeros((B,), jnp.int32)
    state = SpecState(
        tcache=tcache,
        dcache=dcache,
        last_B=first,
        count_B=zeros_B,
        out_BN=jnp.full((B, max_new + k + 1), PAD_ID, jnp.int32),
        logp_BN=jnp.zeros((B, max_new + k + 1), jnp.float32),
        done_B=jnp.zeros((B,), bool),
        length_B=zeros_B,
        stopped_B=jnp.zeros((B,), bool),
        key=key,
        iters=jnp.zeros((), jnp.int32),
        proposed=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
    )
    state = _record(state, first[:, None], first_logp, zeros_B + 1, stops_S, max_new)
    body = lambda s: _iteration(target, tparams, draft, dparams, s, sp, mode, stops_S, k, max_new)
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done_B), body, state)


def speculative_generate(
    target,
    target_params,
    draft,
    draft_params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    forbidden_tokens: Sequence[int] | None = None,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
) -> SpeculativeResult:
    """Sample from ``target`` (with the same processors as ``generate``) using ``draft`` proposals.

    History-dependent penalties are not supported here: they would make q and p depend on draft
    tokens still under verification. The draft must share the target's tokenizer (same vocab).
    """
    if draft.config.vocab_size != target.config.vocab_size:
        raise InputError(
            f"draft has vocab_size={draft.config.vocab_size} but the target has "
            f"{target.config.vocab_size}; give a draft that shares the target's tokenizer"
        )
    validate.settings(num_draft=num_draft)
    cfg = SamplingConfig(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        forbidden_tokens=forbidden_tokens,
    )
    # Both caches also hold the k drafts of the last iteration, fed beyond the final length.
    req = prepare(
        [target, draft], prompts, cfg, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
        seed=seed, extra_slots=num_draft, rollback=num_draft,
    )  # fmt: skip
    state = _run(
        target,
        target_params,
        draft,
        draft_params,
        jnp.asarray(req.tokens),
        jnp.asarray(req.lengths),
        req.key,
        req.sp,
        req.stops_S,
        mode=cfg.mode,
        k=int(num_draft),
        max_new=int(max_new_tokens),
        masked=req.masked,
    )
    base = to_result(state)  # the speculative state carries the sampler's output fields
    return SpeculativeResult(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
        proposed=int(state.proposed),
        accepted=int(state.accepted),
        target_calls=int(state.iters) + 1,
    )
