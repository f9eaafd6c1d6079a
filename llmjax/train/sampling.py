"""Sample a continuation with the model's KV cache: one prefill call, then one token per call."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _pick(logits_BV, key, temperature: float, top_k: int):
    if temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def generate(
    model,
    params,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature=0.8,
    top_k: int = 40,
    seed: int = 0,
    stop_id: int | None = None,
) -> list[int]:
    """Up to ``max_new_tokens`` ids after ``prompt_ids`` (which should start with ``bos``)."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least the bos id")
    limit = model.config.max_seq_len
    max_new_tokens = max(0, min(max_new_tokens, limit - len(prompt_ids)))
    if len(prompt_ids) > limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, beyond max_seq_len={limit}")
    cache = model.init_cache(1, len(prompt_ids) + max_new_tokens)

    @functools.partial(jax.jit, donate_argnums=2)
    def call(params, tokens_BT, cache, key):
        logits, cache = model.apply(params, tokens_BT, cache=cache)
        return _pick(logits[:, -1].astype(jnp.float32), key, temperature, top_k), cache

    key = jax.random.PRNGKey(seed)
    out: list[int] = []
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        nxt, cache = call(params, tokens, cache, sub)
        token = int(nxt[0])
        if stop_id is not None and token == stop_id:
            break
        out.append(token)
        tokens = nxt[:, None]
    return out
