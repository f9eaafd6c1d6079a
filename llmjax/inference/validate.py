"""The checks of every generation argument, shared by ``generate``, ``speculative_generate``, the
decoding helpers and ``llmjax generate``.

Every check is plain Python that runs before anything is compiled or allocated: a bad value inside
a jitted sampler would be silently clipped, wrapped or turned into NaN instead. Each failure raises
``InputError`` with one sentence naming the argument, the value given and what to give instead;
with ``flags=True`` the argument is named as the command line spells it (``--top-p``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable, Sequence
from typing import NoReturn

import jax
import numpy as np

from llmjax.errors import InputError

INT32_MAX = 2**31 - 1
SEED_BOUND = 2**63  # jax.random.key takes a signed 64-bit seed


def label(name: str, flags: bool = False) -> str:
    return "--" + name.replace("_", "-") if flags else name


class Described(str):
    """A description of a value (``int32[2, 3] array``) that messages show without quotes."""

    __repr__ = str.__str__


def show(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def fail(name: str, value, need: str, flags: bool = False) -> NoReturn:
    given = f" {value}" if flags else f"={show(value)}"
    raise InputError(f"{label(name, flags)}{given}: {need}")


def is_int(x) -> bool:
    """A Python or numpy integer; a bool is a mistake here, not the number 0 or 1."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)


def is_real(x) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(
        x, bool | np.bool_
    )


def _off(none_is: str, flags: bool) -> str:
    """How to turn a setting off: None in Python, leaving the flag out on the command line."""
    if not none_is:
        return ""
    return f", or leave it out for {none_is}" if flags else f", or None for {none_is}"


def integer(name, value, low=1, high=None, flags=False, none_is="", bounds="") -> int | None:
    """``value`` as an int in ``[low, high)``; ``None`` is allowed when ``none_is`` says what it means."""
    if value is None and none_is:
        return None
    bounds = bounds or (f">= {low}" if high is None else f"in [{low}, {high})")
    if not is_int(value) or value < low or (high is not None and value >= high):
        fail(name, value, f"must be an int {bounds}{_off(none_is, flags)}", flags)
    return int(value)


def real(name, value, low, high=None, open_low=False, flags=False, none_is="", note=""):
    """A finite float with ``low <= value`` (``<`` when ``open_low``) and ``value <= high``;
    ``None`` is allowed when ``none_is`` says what it means."""
    if value is None and none_is:
        return None
    ok = is_real(value) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        if low == -math.inf:
            need = "must be a finite number"
        elif high is None:
            need = f"must be a finite number {'>' if open_low else '>='} {low}"
        else:
            need = f"must lie in {'(' if open_low else '['}{low}, {high}]"
        need += _off(none_is, flags) + (f" ({note})" if note else "")
        fail(name, value, need, flags)
    return float(value)


# Each scalar setting's rule; the sampling ones are what SamplingConfig documents as "off".
_SETTINGS = {
    "max_new_tokens": lambda v, f: integer("max_new_tokens", v, flags=f),
    "num_draft": lambda v, f: integer("num_draft", v, flags=f),
    "n": lambda v, f: integer("n", v, flags=f),
    "k": lambda v, f: integer("k", v, flags=f),
    "seed": lambda v, f: integer("seed", v, -SEED_BOUND, SEED_BOUND, f, bounds="of 64 bits"),
    "temperature": lambda v, f: real("temperature", v, 0, flags=f, note="0 is greedy"),
    "top_k": lambda v, f: integer("top_k", v, flags=f, none_is="no top-k"),
    "top_p": lambda v, f: real("top_p", v, 0, 1, True, f, "no top-p"),
    "min_p": lambda v, f: real("min_p", v, 0, 1, False, f, "no min-p"),
    "repetition_penalty": lambda v, f: real(
        "repetition_penalty", v, 0, None, True, f, "no penalty", "1 changes nothing"
    ),
    "frequency_penalty": lambda v, f: real(
        "frequency_penalty", v, -math.inf, None, False, f, "no penalty", "0 changes nothing"
    ),
}


def settings(flags: bool = False, **values) -> None:
    """Check scalar settings by name (``max_new_tokens=..., top_p=...``; see ``_SETTINGS``)."""
    for name, value in values.items():
        _SETTINGS[name](value, flags)


def token_ids(name, ids, vocab_size: int | None, flags=False) -> list[int]:
    """A collection of token ids (stop, forbidden, one prompt) as ints in ``[0, vocab_size)``."""
    if isinstance(ids, str | bytes):
        fail(name, ids, "is text; give token ids (encode text with the tokenizer first)", flags)
    if isinstance(ids, np.ndarray | jax.Array):
        array = np.asarray(ids)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            given = Described(f"{array.dtype}{list(array.shape)} array")
            fail(name, given, "give a 1-D int array (or list) of token ids", flags)
        ids = array.tolist()
    elif not isinstance(ids, Iterable) or isinstance(ids, dict):
        example = f", e.g. [{ids}]" if is_int(ids) else ""
        fail(name, ids, f"must be a list of token ids{example}", flags)
    ids = list(ids)
    for i, t in enumerate(ids):
        at = name if flags else f"{name}[{i}]"  # a flag's ids are named by their value alone
        if not is_int(t):
            kind = "None" if t is None else f"a {type(t).__name__}"
            fail(at, t, f"is {kind}; token ids must be ints", flags)
        if vocab_size is not None and not 0 <= t < vocab_size:
            need = f"is outside the vocabulary [0, {vocab_size}); use ids of the model's tokenizer"
            fail(at, t, need, flags)
    return [int(t) for t in ids]


def prompt_batch(prompts, vocab_size: int) -> list[list[int]]:
    """A batch of prompts (a list of token-id lists, or a ``[B, L]`` int array), each checked."""
    if isinstance(prompts, str | bytes):
        fail(
            "prompts",
            prompts,
            "generation takes token ids, not text; encode it, e.g. [[tok.bos_id, *tok.encode(text)]]",
        )
    if isinstance(prompts, np.ndarray | jax.Array):
        array = np.asarray(prompts)
        given = Described(f"{array.dtype}{list(array.shape)} array")
        if array.ndim != 2:
            fix = (
                "add a batch axis: prompts[None]" if array.ndim == 1 else "give one row per prompt"
            )
            fail("prompts", given, f"must be [batch, length]; {fix}")
        if not np.issubdtype(array.dtype, np.integer):
            fail("prompts", given, "token ids must be ints; cast with .astype(np.int32)")
        prompts = list(array)
    elif not isinstance(prompts, Sequence):
        fail("prompts", prompts, "must be a list of prompts, each a list of token ids")
    if len(prompts) == 0:
        fail("prompts", prompts, "give at least one prompt (a list of token ids)")
    if any(is_int(p) for p in prompts):
        fail(
            "prompts",
            prompts,
            f"is one flat list of ids; give a list of prompts: [{show(prompts)}]",
        )
    batch = [token_ids(f"prompts[{b}]", p, vocab_size) for b, p in enumerate(prompts)]
    for b, p in enumerate(batch):
        if not p:
            fail(f"prompts[{b}]", p, "is empty; every prompt needs at least one token (e.g. bos)")
    return batch


def one_prompt(prompt, vocab_size: int) -> list[int]:
    """The single prompt the decoding helpers take (a list of token ids, not a batch)."""
    nested = isinstance(prompt, Sequence) and not isinstance(prompt, str | bytes)
    nested = nested and any(isinstance(p, Sequence | np.ndarray) for p in prompt)
    if nested:
        fail("prompt", prompt, "must be one list of token ids, not a batch; pass prompts[0]")
    ids = token_ids("prompt", prompt, vocab_size)
    if not ids:
        fail("prompt", ids, "is empty; it needs at least one token (e.g. the bos id)")
    return ids


@functools.cache
def memory_bytes() -> int | None:
    """Memory generation can use: the accelerators' total, else the host's (None if unknown)."""
    total = 0
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # backends without memory statistics: fall back to the host's memory
            stats = {}
        total += int(stats.get("bytes_limit", 0))
    if total:
        return total
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def capacity(model, batch: int, cache_len: int, max_new_tokens: int, rollback: int = 0) -> None:
    """Refuse a cache the model cannot index or this machine cannot hold, before allocating it.

    The bytes are those of ``model.init_cache(batch, cache_len, rollback=rollback)``'s arrays
    (sliding-window layers hold ring buffers), from their shapes: nothing is allocated.
    """
    cfg = model.config
    if cfg.position == "learned" and cache_len > cfg.max_seq_len:
        fail(
            "max_new_tokens",
            max_new_tokens,
            f"prompt + new tokens need {cache_len} positions, beyond max_seq_len="
            f"{cfg.max_seq_len} of {cfg.name!r} (learned position table); lower it",
        )
    if cache_len > INT32_MAX:
        fail("max_new_tokens", max_new_tokens, f"the cache would need {cache_len} > 2**31-1 slots")
    shapes = jax.eval_shape(lambda: model.init_cache(batch, cache_len, rollback=rollback))
    need = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(shapes))
    have = memory_bytes()
    if have is not None and need > have:
        fail(
            "max_new_tokens",
            max_new_tokens,
            f"a KV cache of {batch} x {cache_len} slots needs {need / 2**30:,.1f} GiB, more than "
            f"the {have / 2**30:,.1f} GiB of memory here; lower it",
        )
