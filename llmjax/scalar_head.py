"""A scalar head on the decoder: one score per sequence, for reward models and PPO critics.

    head = init_score_head(model, key)                                  # {"score": [D]}
    scores_B = sequence_scores(model, params, head, tokens_BT, attention_mask=mask_BT)

The head is a dict of arrays beside the decoder's params, so ``jax.grad`` over ``(params, head)``
and optax apply to it as they do to the params. A score is the final hidden state (after the
final norm, ``model.apply(..., return_hidden=True)``) at the sequence's last real token, dotted
with ``score``: what transformers' ``*ForSequenceClassification`` computes with ``num_labels=1``
(a ``score`` Linear without bias), so ``llmjax.interop.hf_score`` reads and writes those
checkpoints. Only the decoder runs: the params may lack ``lm_head``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import axes
from llmjax.config import dtype_of
from llmjax.errors import InputError
from llmjax.models.model import _check_tokens


def init_score_head(model, key) -> dict:
    """``{"score": [D]}`` drawn as transformers draws ``score``: normal, std ``init_std``."""
    cfg = model.config
    score = cfg.init_std * jax.random.normal(key, (cfg.d_model,), jnp.float32)
    return {"score": score.astype(dtype_of(cfg.param_dtype))}


def score_axes(model) -> dict:
    """Logical axis names of the head, shaped like it: ``score`` runs along the model width."""
    del model  # one layout for every model; taken for symmetry with ``model.param_axes()``
    return {"score": (axes.EMBED,)}


def check_head(model, head):
    """The head's ``score`` ``[D]``, or an InputError naming what is wrong with ``head``."""
    D = model.config.d_model
    score = head.get("score") if isinstance(head, dict) else None
    if score is not None and tuple(getattr(score, "shape", ())) == (D,):
        return score
    if not isinstance(head, dict):
        got = f"a {type(head).__name__}"
    elif score is None:
        got = f"a dict with keys {sorted(map(str, head))}"
    else:
        got = f"score of shape {list(getattr(score, 'shape', ()))}"
    raise InputError(
        f"head must be {{'score': [d_model={D}]}}, got {got}; build it with "
        "init_score_head(model, key) or load it with from_hf_scorer"
    )


def last_index(tokens_BT, *, segment_ids=None, attention_mask=None, last_index_B=None):
    """Each row's last real token ``[B]`` (int32) in int tokens ``[B, T]``; see ``sequence_scores``."""
    B, T = jnp.shape(tokens_BT)
    if last_index_B is not None:
        index = jnp.asarray(last_index_B)
        if index.shape != (B,) or not jnp.issubdtype(index.dtype, jnp.integer):
            raise InputError(
                f"last_index_B must be int [batch={B}] (one index into the {T} tokens per row); "
                f"got {index.dtype}{list(index.shape)}"
            )
        if not isinstance(index, jax.core.Tracer):
            host = np.asarray(index)
            if host.size and (host.min() < 0 or host.max() >= T):
                raise InputError(
                    f"last_index_B must lie in [0, {T}) (the tokens' length); got min "
                    f"{host.min()}, max {host.max()}"
                )
        return index.astype(jnp.int32)
    real = None
    for name, x in (("segment_ids", segment_ids), ("attention_mask", attention_mask)):
        if x is None:
            continue
        x = jnp.asarray(x)
        if x.shape != (B, T):
            raise InputError(
                f"{name} must have the tokens' shape [batch, length] = {[B, T]}; got "
                f"{x.dtype}{list(x.shape)}: give one value per token"
            )
        x = x > 0 if name == "segment_ids" else x.astype(bool)
        real = x if real is None else real & x
    if real is None:
        return jnp.full((B,), T - 1, jnp.int32)
    # transformers' argmax of slot * is_real: a row without a real token reads slot 0.
    slots = jnp.arange(T, dtype=jnp.int32)[None, :]
    return jnp.max(jnp.where(real, slots, 0), axis=1)


def sequence_scores(
    model,
    params,
    head,
    tokens_BT,
    *,
    positions=None,
    segment_ids=None,
    attention_mask=None,
    last_index_B=None,
    return_aux: bool = False,
):
    """One float32 score ``[B]`` per row of int tokens ``[B, T]``: the head at its last real token.

    The last real token of a row is ``last_index_B[b]`` when given; otherwise the rightmost slot
    whose ``segment_ids`` is above 0 and whose ``attention_mask`` is true (whichever are given; a
    row with none reads slot 0); otherwise slot T - 1. That is transformers' rule (the rightmost
    token that is not ``pad_token_id``) with llmjax's padding marks, so right and left padding
    both score the sequence's final token. A row holds one sequence: packed rows score only their
    last one (give ``last_index_B`` for another). ``positions``, ``segment_ids`` and
    ``attention_mask`` reach ``model.apply`` as they are; only the chosen token is normed and
    scored. ``return_aux=True`` returns ``(scores, aux)`` with ``model.apply``'s aux (a
    mixture-of-experts decoder's router losses, which a trained scorer adds to its loss).
    """
    score_D = check_head(model, head)
    tokens_BT = _check_tokens(model.config, tokens_BT)
    index_B = last_index(
        tokens_BT,
        segment_ids=segment_ids,
        attention_mask=attention_mask,
        last_index_B=last_index_B,
    )
    out = model.apply(
        params,
        tokens_BT,
        positions=positions,
        segment_ids=segment_ids,
        attention_mask=attention_mask,
        logit_index=index_B[:, None],
        return_hidden=True,
        return_aux=return_aux,
    )
    hidden_B1D, aux = out if return_aux else (out, None)
    scores_B = jnp.einsum("BD,D->B", hidden_B1D[:, 0], score_D.astype(jnp.float32))
    return (scores_B, aux) if return_aux else scores_B
