"""Hugging Face ``...ForSequenceClassification`` checkpoints with one label: reward models, critics.

Such a checkpoint is a causal LM's decoder (the ``model.*`` or ``transformer.*`` tensors that
``llmjax.interop.hf`` maps) with ``score.weight`` ``[1, D]`` where ``lm_head.weight`` would be. It
loads as ``(model, params, head)``: ``model`` has the decoder's config as stored (its
``tie_embeddings`` included), ``params`` are that model's parameters without ``lm_head`` (there is
none to read; families that tie embeddings have none anyway), and ``head`` is the
``llmjax.scalar_head`` dict ``{"score": [D]}``. Score with ``llmjax.scalar_head.sequence_scores``;
``model.apply`` gives hidden states (``return_hidden=True``), not logits, for these params.
"""

from __future__ import annotations

from pathlib import Path

from llmjax.errors import HFCheckpointError, InputError
from llmjax.interop.hf import (
    Tensor,
    _unflatten,
    check_params,
    check_target,
    configure,
    layer_shapes,
    load_tensors,
    per_layer,
    read_config,
    tensor_table,
    write_checkpoint,
)
from llmjax.interop.hf_config import (
    CLASSIFIERS,
    UnsupportedConfig,
    architecture_of,
    config_to_hf,
    default_architecture,
)
from llmjax.models.model import Model
from llmjax.scalar_head import check_head

# transformers' ``score``: Linear(hidden, num_labels=1, bias=False), stored [1, D].
SCORE = Tensor("score.weight", ("score",), "linear")
_CLASSIFIER_OF = {lm: c for c, lm in CLASSIFIERS.items()}


def _labels(hf: dict) -> int | None:
    """How many labels the config declares (transformers saves ``id2label``), if it says."""
    id2label = hf.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = hf.get("num_labels")
    return n if isinstance(n, int) else None


def from_hf_scorer(
    path,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    shardings=None,
    **config_overrides,
) -> tuple[Model, dict, dict]:
    """``(model, params, head)`` from a local ``...ForSequenceClassification`` directory.

    Arguments are ``llmjax.from_hf``'s; ``shardings`` places the decoder's params (the head is
    one vector). A causal LM's directory is refused: it has no ``score.weight`` to read.
    """
    path = Path(path)
    hf = read_config(path)
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in CLASSIFIERS), None)
    if arch is None:
        try:
            lm = architecture_of(hf)
        except UnsupportedConfig:
            raise UnsupportedConfig(
                f"{path / 'config.json'}: unsupported architecture "
                f"{archs or hf.get('model_type')!r}; from_hf_scorer reads {list(CLASSIFIERS)}"
            ) from None
        raise HFCheckpointError(
            f"{path} holds a {lm}, a language model with no score.weight; load it with "
            "llmjax.from_hf and start a head with llmjax.scalar_head.init_score_head, or give a "
            "...ForSequenceClassification directory"
        )
    labels = _labels(hf)
    if labels not in (None, 1):
        raise HFCheckpointError(
            f"{path / 'config.json'}: {arch} with {labels} labels; a scalar head has one "
            "(num_labels=1, as reward models and critics are saved)"
        )
    lm = CLASSIFIERS[arch]
    _, cfg = configure(
        path,
        {**hf, "architectures": [lm]},
        param_dtype=param_dtype,
        dtype=dtype,
        **config_overrides,
    )
    model = Model(cfg)
    shapes = {k: v for k, v in layer_shapes(model).items() if k != "lm_head"}
    shapes["score"] = (cfg.d_model,)
    flat = load_tensors(path, cfg, lm, shapes, shardings=shardings, head=[SCORE], name=arch)
    head = {"score": flat.pop("score")}
    return model, _unflatten(flat), head


def to_hf_scorer(
    model: Model,
    params,
    head,
    path,
    *,
    pad_token_id: int,
    architecture: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``(params, head)`` as a ``...ForSequenceClassification`` directory with one label.

    ``params`` may hold ``lm_head`` (a reward model started from a language model) or not; it is
    not written. ``pad_token_id`` goes into config.json: transformers scores the rightmost token
    that is not it. ``architecture`` defaults to the classifier of the family ``to_hf`` would
    choose; checks and file handling are ``to_hf``'s.
    """
    cfg = model.config
    arch = architecture or _CLASSIFIER_OF[default_architecture(cfg)]
    if arch not in CLASSIFIERS:
        raise UnsupportedConfig(
            f"unsupported architecture {arch!r}; to_hf_scorer writes {list(CLASSIFIERS)}"
        )
    if (
        not isinstance(pad_token_id, int)
        or isinstance(pad_token_id, bool)
        or not 0 <= pad_token_id < cfg.vocab_size
    ):
        raise InputError(
            f"pad_token_id must be a token id in [0, {cfg.vocab_size}), got {pad_token_id!r}; "
            "give the tokenizer's pad id (transformers finds each sequence's end by it)"
        )
    lm = CLASSIFIERS[arch]
    hf = config_to_hf(cfg, lm)
    hf.update(
        architectures=[arch],
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad_token_id,
    )
    path = Path(path)
    check_target(path)
    flat = per_layer(model, check_params(model, params, drop=("lm_head",)))
    flat["score"] = check_head(model, head)
    table = [e for e in tensor_table(cfg, lm) if e.hf != "lm_head.weight"] + [SCORE]
    return write_checkpoint(path, cfg, hf, table, flat, max_shard_bytes)
