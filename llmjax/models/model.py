"""The functional surface: ``Model.init(key) -> params`` and ``Model.apply(params, tokens, ...)``.

Parameters are plain nested dicts of arrays, so ``jax.jit``, ``jax.grad``, ``jax.vmap``, optax and
orbax apply to them directly; the Flax NNX modules are rebuilt from them inside each call (at trace
time only, when jitted).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llmjax import axes
from llmjax.config import ModelConfig, dtype_of
from llmjax.errors import InputError
from llmjax.layers import attend
from llmjax.layers.attention import RingPlan
from llmjax.models.scan import layer_axes
from llmjax.models.transformer import MaskContext, Transformer


@struct.dataclass
class KVCache:
    """Per-layer keys and values, each slot's segment id and each sequence's length.

    A layer's keys and values are ``[B, K, S, C]`` for S = max_len slots, heads-major so that a
    decode step attends over contiguous slots of each kv head. With ring buffers (the default of
    ``Model.init_cache`` when the model has sliding-window layers) each sliding-window layer holds
    ``[B, K, R, C]`` instead, R = window + rollback < max_len: slot p lives in entry ``p % R``,
    ``ring_slot_BR`` is the slot each entry holds (-1: none yet) and ``ring_seg_BR`` its segment
    id (0: padding or empty), shared by all sliding-window layers. ``seg_BS`` holds the segment id
    of every slot for the global layers.

    ``length[b]`` is the number of slots written for sequence b; the next call writes its tokens there.
    ``packed`` records (statically) whether padding or segments were ever written.
    """

    k: tuple
    v: tuple
    seg_BS: jax.Array
    length_B: jax.Array
    ring_slot_BR: jax.Array | None = None
    ring_seg_BR: jax.Array | None = None
    packed: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return self.seg_BS.shape[1]

    @property
    def ring_len(self) -> int | None:
        """Entries R of the sliding-window layers' ring buffers (None: every layer keeps max_len)."""
        return None if self.ring_slot_BR is None else self.ring_slot_BR.shape[1]

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in jax.tree.leaves(self)))

    def __getitem__(self, layer):
        return self.k[layer], self.v[layer]


def _is_int(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer)


def _desc(x) -> str:
    return f"{x.dtype}{list(x.shape)}"


def _check_tokens(cfg, tokens):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not _is_int(tokens):
        if tokens.ndim == 1:
            fix = "add a batch axis: tokens[None]"
        elif tokens.ndim != 2:
            fix = "give one row of ids per sequence"
        else:
            fix = "cast them: tokens.astype(jnp.int32)"
        raise InputError(f"tokens must be an int array [batch, length], got {_desc(tokens)}; {fix}")
    ids = _host(tokens)
    if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
        raise InputError(
            f"token ids must lie in [0, {cfg.vocab_size}) (vocab_size of "
            f"{cfg.name!r}); got min {ids.min()}, max {ids.max()}"
        )
    return tokens


def _check_logit_index(logit_index, B: int, T: int):
    if logit_index is None:
        return None
    logit_index = jnp.asarray(logit_index)
    if logit_index.ndim != 2 or logit_index.shape[0] != B or not _is_int(logit_index):
        raise InputError(
            f"logit_index must be int [batch={B}, N] (indices into the {T} tokens); got "
            f"{_desc(logit_index)}"
        )
    index = _host(logit_index)
    if index is not None and index.size and (index.min() < 0 or index.max() >= T):
        raise InputError(
            f"logit_index must lie in [0, {T}) (the tokens' length); got min {index.min()}, "
            f"max {index.max()}"
        )
    return logit_index.astype(jnp.int32)


def _like_tokens(name, x, shape, kind):
    """``x`` as an array of ``shape`` (the tokens' ``[B, T]``) and ``kind``, or an InputError.

    Shapes and dtypes are static, so this raises under ``jax.jit`` too, at trace time.
    """
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != shape:
        raise InputError(
            f"{name} must have the tokens' shape [batch, length] = {list(shape)}; got "
            f"{_desc(x)}: give one value per token"
        )
    if not (_is_int(x) or (kind == "bool or int" and x.dtype == jnp.bool_)):
        cast = "bool" if kind == "bool or int" else "jnp.int32"
        raise InputError(f"{name} must be {kind}, got {_desc(x)}; cast it: {name}.astype({cast})")
    return x


def _check_cache(cfg, cache, B: int) -> None:
    """A cache built for this model and this batch: layer count, head layout and batch size."""
    if not isinstance(cache, KVCache):
        raise InputError(
            f"cache must be a KVCache from model.init_cache(batch_size, max_len); got "
            f"{type(cache).__name__}"
        )
    fix = f"build it with this model's init_cache({B}, max_len)"
    if len(cache.k) != cfg.n_layers or len(cache.v) != cfg.n_layers:
        raise InputError(
            f"cache has {len(cache.k)} layers but {cfg.name!r} has n_layers={cfg.n_layers}; {fix}"
        )
    S, R, W = cache.max_len, cache.ring_len, _window(cfg)
    if (cache.ring_slot_BR is None) != (cache.ring_seg_BR is None):
        raise InputError(f"cache has only one of ring_slot_BR and ring_seg_BR; {fix}")
    if R is not None and W is None:
        raise InputError(
            f"cache has ring buffers for sliding-window layers but {cfg.name!r} has none; {fix}"
        )
    if R is not None and R < W:
        raise InputError(
            f"cache's ring buffers hold {R} entries, fewer than the sliding window {W} of "
            f"{cfg.name!r}; {fix}"
        )
    parts = []
    for i in range(cfg.n_layers):
        ring = R is not None and cfg.layer_window(i) is not None
        expected = (B, cfg.resolved_kv_heads, R if ring else S, cfg.resolved_head_dim)
        layout = f"[batch, kv_heads, {'ring' if ring else 'max_len'}, head_dim]"
        parts += [(f"cache.{n}[{i}]", getattr(cache, n)[i], expected, layout) for n in "kv"]
    parts.append(("cache.seg_BS", cache.seg_BS, (B, S), "[batch, max_len]"))
    parts.append(("cache.length_B", cache.length_B, (B,), "[batch]"))
    if R is not None:
        parts.append(("cache.ring_slot_BR", cache.ring_slot_BR, (B, R), "[batch, ring]"))
        parts.append(("cache.ring_seg_BR", cache.ring_seg_BR, (B, R), "[batch, ring]"))
    for name, x, expected, layout in parts:
        if tuple(x.shape) != expected:
            raise InputError(
                f"{name} has shape {list(x.shape)}, expected {list(expected)} {layout} for "
                f"{cfg.name!r} and tokens of batch {B}; {fix}"
            )


def _window(cfg) -> int | None:
    """The sliding window of the model's local layers (None: it has none)."""
    return cfg.sliding_window if "local" in cfg.layer_kinds else None


def _check_rollback(cfg, cache, used) -> None:
    """Refuse a ``length_B`` lowered so far that the ring buffers lost keys it still needs.

    Sequence b's next token attends to slots [length - W + 1, length); a ring of R entries
    lost slot a when it wrote a + R, i.e. for a <= newest - R - 1.
    """
    slot, seg = _host(cache.ring_slot_BR), _host(cache.ring_seg_BR)
    if slot is None or seg is None or used is None:
        return
    R, W = cache.ring_len, _window(cfg)
    newest = np.where(seg > 0, slot + 1, 0).max(axis=1)  # one past the newest key held
    lost = np.maximum(used - W + 1, 0) <= np.minimum(used - 1, newest - R - 1)
    if lost.any():
        b = int(np.argmax(lost))
        back = int(newest[b] - used[b])
        raise InputError(
            f"cache.length_B[{b}]={used[b]} is {back} below the newest key in the ring buffers, "
            f"which hold {R} entries for the sliding window {W} of {cfg.name!r} and so allow "
            f"lowering it by at most {R - W + 1}; build the cache with init_cache(..., "
            f"rollback={back})"
        )


def _ring_plan(cfg, cache, seg_BT, q_slot_BT):
    """One call's ``RingPlan`` and the ring's ``(slot, segment)`` bookkeeping after it."""
    R, W = cache.ring_len, _window(cfg)
    B, T = seg_BT.shape
    slot_BR = cache.ring_slot_BR
    # Entries at or past the write position were dropped by lowering length_B (rejected drafts):
    # the full cache overwrites them with this call's tokens or hides them causally.
    seg_BR = jnp.where(slot_BR < cache.length_B[:, None], cache.ring_seg_BR, 0)
    mask_old = attend.attention_mask(q_slot_BT, seg_BT, seg_BR, W, kv_slot_BS=slot_BR)
    mask_new = attend.attention_mask(q_slot_BT, seg_BT, seg_BT, W, kv_slot_BS=q_slot_BT)
    # An entry takes the newest real token of the call that maps to it. Padding is never written:
    # no real token sees it, and it could evict a key still in the window (right-padded prompts
    # whose lengths are reset after the prefill).
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    entry_BT = q_slot_BT % R
    real_BT = seg_BT != 0
    rows_B1 = jnp.arange(B)[:, None]
    newest_BR = jnp.full((B, R), -1, jnp.int32)
    newest_BR = newest_BR.at[rows_B1, entry_BT].max(jnp.where(real_BT, t_BT, -1))
    kept_BT = real_BT & (jnp.take_along_axis(newest_BR, entry_BT, axis=1) == t_BT)
    target_BT = jnp.where(kept_BT, entry_BT, R)
    slot_BR = slot_BR.at[rows_B1, target_BT].set(q_slot_BT, mode="drop")
    seg_BR = seg_BR.at[rows_B1, target_BT].set(seg_BT, mode="drop")
    return RingPlan(mask_old, mask_new, target_BT), slot_BR, seg_BR


def _host(x):
    """``x`` as a numpy array when its value is known (eager calls), else None (under a trace)."""
    return None if x is None or isinstance(x, jax.core.Tracer) else np.asarray(x)


class Model:
    """A decoder-only language model described by a ``ModelConfig``."""

    def __init__(self, config: ModelConfig):
        self.config = config
        abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
        self._graphdef, self._abstract_state = nnx.split(abstract)

    def __repr__(self):
        return f"Model({self.config.name!r}, {self.num_params():,} parameters)"

    # Parameters ------------------------------------------------------------------------------------
    def init(self, key) -> dict:
        """Random parameters as a nested dict of arrays (wrap in ``jax.jit`` for speed and sharding)."""
        module = Transformer(self.config, rngs=nnx.Rngs(params=key))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def abstract_params(self) -> dict:
        """``jax.ShapeDtypeStruct`` leaves: the parameter tree without allocating memory."""
        return nnx.to_pure_dict(self._abstract_state)

    def param_axes(self) -> dict:
        """Logical axis names of every parameter, in a tree shaped like the parameters."""
        flat = {path: var.axes for path, var in nnx.to_flat_state(self._abstract_state)}
        return nnx.traversals.unflatten_mapping(flat)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_params()))

    def num_active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to (MoE models)."""
        cfg, total = self.config, 0
        for _, var in nnx.to_flat_state(self._abstract_state):
            size = int(np.prod(var.shape))
            # [E, ...] (stacked: [R, E, ...]): each token runs k of the E experts
            if layer_axes(var.axes)[0] == axes.EXPERTS:
                size = size // cfg.n_experts * cfg.experts_per_token
            total += size
        return total

    # Forward ---------------------------------------------------------------------------------------
    def apply(
        self,
        params,
        tokens,
        *,
        positions=None,
        segment_ids=None,
        attention_mask=None,
        cache: KVCache | None = None,
        logit_index=None,
        return_hidden: bool = False,
        return_aux: bool = False,
    ):
        """Logits ``[B, T, V]`` (float32) for int tokens ``[B, T]``; with ``cache`` also the new cache.

        ``positions`` (RoPE or learned positions) default to each token's slot. ``segment_ids`` keep
        packed documents from attending to each other; ``attention_mask`` (1 real, 0 padding) hides
        padded keys. ``logit_index`` (int ``[B, N]``, indices into T) computes logits ``[B, N, V]``
        at those tokens only: a prefill needs one row, not T times the vocabulary.

        ``return_hidden=True`` returns the final hidden states ``[B, T, D]`` (or ``[B, N, D]`` with
        ``logit_index``) in float32 instead: after the final norm, before the unembedding, which is
        not computed, so params without ``lm_head`` (a scorer's, see ``llmjax.scalar_head``) serve.

        ``return_aux=True`` appends a dict of auxiliary losses to the result: ``(logits, aux)``,
        or ``(logits, cache, aux)`` with a cache. A mixture-of-experts model's holds
        ``balance_loss`` and ``router_z_loss`` (float32 scalars over the real tokens, see
        ``llmjax.layers.moe.aux_losses``); a dense model's is empty.

        With ``cache`` the tokens are written at each sequence's ``length_B``; a sliding-window
        layer's ring buffer is attended together with the new keys and then takes the newest of
        them, so any number of tokens per call gives the full cache's outputs (up to summation
        order) for every real token; outputs at padding are unspecified.

        Inputs of the wrong shape or dtype, and a ``cache`` built for another batch size or model,
        raise ``InputError`` naming the argument, also under ``jax.jit`` (shapes are static). Values
        (ids, positions, indices, cache room, a ``length_B`` lowered beyond what the ring buffers
        keep) are checked only on concrete arrays: under ``jax.jit`` out-of-range ids cannot
        raise, they give NaN logits.
        """
        cfg = self.config
        tokens = _check_tokens(cfg, tokens)
        B, T = tokens.shape
        positions = _like_tokens("positions", positions, (B, T), "int")
        segment_ids = _like_tokens("segment_ids", segment_ids, (B, T), "int")
        attention_mask = _like_tokens("attention_mask", attention_mask, (B, T), "bool or int")
        logit_index = _check_logit_index(logit_index, B, T)
        if cache is not None:
            _check_cache(cfg, cache, B)
        needs_head = not (return_hidden or cfg.tie_embeddings)
        if needs_head and isinstance(params, dict) and "lm_head" not in params:
            raise InputError(
                f"params have no lm_head, which {cfg.name!r} needs for logits (a scorer's "
                "decoder has none); ask for hidden states with return_hidden=True"
            )
        seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
        if attention_mask is not None:
            seg = jnp.where(attention_mask.astype(bool), seg, 0)
        packed = segment_ids is not None or attention_mask is not None
        arange = jnp.arange(T, dtype=jnp.int32)[None, :]
        layers, ring = None, None
        if cache is None:
            q_slot = jnp.broadcast_to(arange, (B, T))
            ctx = MaskContext(q_slot, seg, seg, None, packed)
        else:
            start = cache.length_B
            used = _host(start)
            if used is not None and used.max() + T > cache.max_len:
                raise InputError(
                    f"KV cache overflow: {used.max()} slots used + {T} new tokens > "
                    f"max_len {cache.max_len}; build a longer cache"
                )
            q_slot = start[:, None] + arange
            kv_seg = jax.vmap(lambda c, s, o: jax.lax.dynamic_update_slice(c, s, (o,)))(
                cache.seg_BS, seg, start
            )
            packed = packed or cache.packed
            ctx = MaskContext(q_slot, seg, kv_seg, start, packed)
            layers = tuple(cache[i] for i in range(cfg.n_layers))
            if cache.ring_len is not None:
                _check_rollback(cfg, cache, used)
                plan, *ring = _ring_plan(cfg, cache, seg, q_slot)
                local = [cfg.layer_window(i) is not None for i in range(cfg.n_layers)]
                layers = tuple(
                    (*kv, plan) if lo else kv for kv, lo in zip(layers, local, strict=True)
                )
        positions = q_slot if positions is None else positions.astype(jnp.int32)
        pos = _host(positions) if cfg.position == "learned" else None
        if pos is not None and pos.size and (pos.max() >= cfg.max_seq_len or pos.min() < 0):
            raise InputError(
                f"positions must lie in [0, {cfg.max_seq_len}), got min {pos.min()}, max "
                f"{pos.max()}: beyond max_seq_len={cfg.max_seq_len} of {cfg.name!r} (learned "
                "position table); give shorter sequences or restart positions per document"
            )

        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self._graphdef, state)
        out, layers, aux = module(tokens, positions, ctx, layers, logit_index, not return_hidden)
        if cache is None:
            return (out, aux) if return_aux else out
        new_cache = KVCache(
            k=tuple(kv[0] for kv in layers),
            v=tuple(kv[1] for kv in layers),
            seg_BS=ctx.kv_seg_BS,
            length_B=cache.length_B + T,
            ring_slot_BR=None if ring is None else ring[0],
            ring_seg_BR=None if ring is None else ring[1],
            packed=packed,
        )
        return (out, new_cache, aux) if return_aux else (out, new_cache)

    def init_cache(
        self, batch_size: int, max_len: int, dtype=None, *, ring: bool = True, rollback: int = 0
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens.

        Global layers keep ``max_len`` slots. Sliding-window layers (window W) keep a ring buffer
        of W + ``rollback`` entries instead, when that is fewer: memory O(window) rather than
        O(max_len), and the same outputs. ``ring=False`` gives them ``max_len`` slots too.

        ``rollback``: by how many tokens a caller may lower ``length_B`` after a call, to drop
        that call's newest tokens (speculative decoding drops rejected drafts); the ring keeps
        that many keys beyond the window. Resetting ``length_B`` to the prompt lengths after a
        right-padded, masked prefill needs none: padding is never written to a ring.
        """
        cfg = self.config
        if isinstance(rollback, bool) or not isinstance(rollback, int | np.integer) or rollback < 0:
            raise InputError(
                f"rollback must be an int >= 0 (tokens a caller may drop by lowering length_B), "
                f"got {rollback!r}"
            )
        dtype = dtype or dtype_of(cfg.dtype)
        W = _window(cfg) if ring else None
        R = W + int(rollback) if W is not None and W + rollback < max_len else None
        K, C = cfg.resolved_kv_heads, cfg.resolved_head_dim

        def slots(i):
            S = R if R is not None and cfg.layer_window(i) is not None else max_len
            return jnp.zeros((batch_size, K, S, C), dtype)

        return KVCache(
            k=tuple(slots(i) for i in range(cfg.n_layers)),
            v=tuple(slots(i) for i in range(cfg.n_layers)),
            seg_BS=jnp.zeros((batch_size, max_len), jnp.int32),
            length_B=jnp.zeros((batch_size,), jnp.int32),
            ring_slot_BR=None if R is None else jnp.full((batch_size, R), -1, jnp.int32),
            ring_seg_BR=None if R is None else jnp.zeros((batch_size, R), jnp.int32),
        )
