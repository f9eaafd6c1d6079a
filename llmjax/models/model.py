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

from llmjax.config import ModelConfig, dtype_of
from llmjax.models.transformer import MaskContext, Transformer


@struct.dataclass
class KVCache:
    """Per-layer keys and values ``[B, K, S, C]``, each slot's segment id and each sequence's length.

    Heads-major so that a decode step attends over contiguous slots of each kv head.

    ``length[b]`` is the number of slots written for sequence b; the next call writes its tokens there.
    ``packed`` records (statically) whether padding or segments were ever written.
    """

    k: tuple
    v: tuple
    seg_BS: jax.Array
    length_B: jax.Array
    packed: bool = struct.field(pytree_node=False, default=False)

    @property
    def max_len(self) -> int:
        return self.seg_BS.shape[1]

    def __getitem__(self, layer):
        return self.k[layer], self.v[layer]


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
    ):
        """Logits ``[B, T, V]`` (float32) for int tokens ``[B, T]``; with ``cache`` also the new cache.

        ``positions`` (RoPE or learned positions) default to each token's slot. ``segment_ids`` keep
        packed documents from attending to each other; ``attention_mask`` (1 real, 0 padding) hides
        padded keys. ``logit_index`` (int ``[B, N]``, indices into T) computes logits ``[B, N, V]``
        at those tokens only: a prefill needs one row, not T times the vocabulary. Under
        ``jax.jit`` out-of-range ids cannot raise: they give NaN logits.
        """
        cfg = self.config
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens must be an int array [batch, length], got {tokens.dtype}"
                f"{list(tokens.shape)}"
            )
        B, T = tokens.shape
        ids = _host(tokens)
        if ids is not None and ids.size and (ids.min() < 0 or ids.max() >= cfg.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {cfg.vocab_size}) (vocab_size of "
                f"{cfg.name!r}); got min {ids.min()}, max {ids.max()}"
            )
        seg = (
            jnp.ones((B, T), jnp.int32)
            if segment_ids is None
            else jnp.asarray(segment_ids, jnp.int32)
        )
        if attention_mask is not None:
            seg = jnp.where(jnp.asarray(attention_mask).astype(bool), seg, 0)
        packed = segment_ids is not None or attention_mask is not None
        arange = jnp.arange(T, dtype=jnp.int32)[None, :]
        if cache is None:
            q_slot = jnp.broadcast_to(arange, (B, T))
            ctx = MaskContext(q_slot, seg, seg, None, packed)
        else:
            start = cache.length_B
            used = _host(start)
            if used is not None and used.max() + T > cache.max_len:
                raise ValueError(
                    f"KV cache overflow: {used.max()} slots used + {T} new tokens > "
                    f"max_len {cache.max_len}; build a longer cache"
                )
            q_slot = start[:, None] + arange
            kv_seg = jax.vmap(lambda c, s, o: jax.lax.dynamic_update_slice(c, s, (o,)))(
                cache.seg_BS, seg, start
            )
            packed = packed or cache.packed
            ctx = MaskContext(q_slot, seg, kv_seg, start, packed)
        positions = q_slot if positions is None else jnp.asarray(positions, jnp.int32)
        pos = _host(positions) if cfg.position == "learned" else None
        if pos is not None and pos.size and pos.max() >= cfg.max_seq_len:
            raise ValueError(
                f"position {pos.max()} is beyond max_seq_len={cfg.max_seq_len} of "
                f"{cfg.name!r} (learned position table)"
            )

        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        module = nnx.merge(self._graphdef, state)
        if logit_index is not None:
            logit_index = jnp.asarray(logit_index, jnp.int32)
            if logit_index.ndim != 2 or logit_index.shape[0] != B:
                raise ValueError(
                    f"logit_index must be int [batch={B}, N]; got shape {list(logit_index.shape)}"
                )
        logits, layers = module(tokens, positions, ctx, cache, logit_index)
        if cache is None:
            return logits
        new_cache = KVCache(
            k=tuple(kv[0] for kv in layers),
            v=tuple(kv[1] for kv in layers),
            seg_BS=ctx.kv_seg_BS,
            length_B=cache.length_B + T,
            packed=packed,
        )
        return logits, new_cache

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        cfg = self.config
        shape = (batch_size, cfg.resolved_kv_heads, max_len, cfg.resolved_head_dim)
        dtype = dtype or dtype_of(cfg.dtype)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
        return KVCache(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
            seg_BS=jnp.zeros((batch_size, max_len), jnp.int32),
            length_B=jnp.zeros((batch_size,), jnp.int32),
        )
