"""Preference tuning: DPO and its variants, and Bradley-Terry reward models, on TRL-format pairs.

A recipe module is configs, a loss and data. The data is ``llmjax.data.preference`` (each batch
holds ``B`` pairs, chosen and rejected side by side on axis 1); the base, what trains over it
(every parameter, a subset, or LoRA adapters over a frozen, optionally quantized base) and the
losses of ``llmjax.losses`` become a ``Task`` for the shared loop.

DPO (``DPOConfig``, ``llmjax dpo``). The policy starts as the base; the reference is the base as
it was. Its log-probs are either computed once before training, stored beside the checkpoints
(``reference_logps.npz``, see ``llmjax.recipes.pairs``) and read with each batch, so no reference model is in memory while
training (``reference="cached"``, the default), or computed in every step
(``reference="online"``): with LoRA from the frozen base with the adapters off (no second copy);
with full fine-tuning from a frozen copy of the base. SimPO and ORPO use no reference: none is
loaded or computed. IPO, SimPO and ORPO score a completion by its mean token log-prob, the
others by the sum.

Reward models (``RewardConfig``, ``llmjax reward``): the base plus a scalar head
(``llmjax.scalar_head``) at each sequence's last token, trained with the Bradley-Terry loss. The
trainable tree is ``{"decoder": ..., "head": {"score": [D]}}``; the output head is left out of
full fine-tuning by default (a reward model never reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

import llmjax
from llmjax.checkpoint.manager import absolute
from llmjax.config import ConfigError, ModelConfig
from llmjax.data.hf_tokenizer import keep_copy
from llmjax.data.preference import PreferenceDataConfig, build_preference_data
from llmjax.lora import LoraConfig
from llmjax.losses import (
    PREFERENCE_LOSSES,
    orpo_loss,
    preference_loss,
    real_tokens,
    reward_model_loss,
    simpo_loss,
)
from llmjax.losses.core import add_router_loss
from llmjax.recipes.pairs import (
    Unindexed,
    WithReference,
    as_pairs,
    attach,
    cached_reference,
    flat,
    pair_logps,
    without_index,
)
from llmjax.recipes.sft import check_tuning, load_base, trainable
from llmjax.scalar_head import init_score_head, score_axes, sequence_scores
from llmjax.train import LoopConfig, OptimizerConfig, Task, TrainResult, rundir, train

LOSSES = (*PREFERENCE_LOSSES, "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
AVERAGED = ("ipo", "simpo", "orpo")  # losses on mean token log-probs
REFERENCES = ("cached", "online")
# A reward model never reads the output head: full fine-tuning leaves it out by default.
WITHOUT_LM_HEAD = r"(?!lm_head\b).*"


@dataclass(frozen=True)
class _Tuned:
    """What both preference recipes share: the base, the data and what trains over the base."""

    base: str = ""  # a llmjax run directory or a Hugging Face model directory
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-6, warmup_steps=10, weight_decay=0.0)
    )
    loop: LoopConfig = field(
        default_factory=lambda: LoopConfig(steps=200, eval_every=50, save_every=50, sample_tokens=0)
    )
    lora: LoraConfig | None = None  # None: full fine-tuning
    quantize_base: str = ""  # LoRA only: the frozen base stored as int8 or nf4 (QLoRA)
    quantize_keep: str = "lm_head"  # weights a quantized base keeps in float (a regex)
    trainable: str = ""  # full fine-tuning only: a regex over parameter paths; empty: all
    # The base's layers: scanned (stacked, one lax.scan) or unrolled, which regexes that choose
    # some layers only (LoRA targets, trainable, quantize_keep) need.
    scan_layers: bool = True
    model: ModelConfig | None = None

    def __post_init__(self):
        check_tuning(self)


@dataclass(frozen=True)
class DPOConfig(_Tuned):
    """One DPO-family run. ``beta`` 0 takes the loss's usual value: 2.0 for SimPO, else 0.1."""

    loss: str = "sigmoid"  # sigmoid (DPO; cDPO with label_smoothing), hinge, ipo, robust, ...
    beta: float = 0.0
    label_smoothing: float = 0.0  # sigmoid and robust
    gamma: float = 0.5  # simpo: the target reward margin
    lam: float = 0.1  # orpo: the weight of the odds-ratio term
    reference: str = "cached"  # cached: computed once before training; online: every step
    name: str = "dpo"

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"reference={self.reference!r}: expected cached or online")
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta}: must be positive (0: the loss's default)")
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} applies to --loss sigmoid (cDPO) or "
                f"robust, not {self.loss}"
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: must lie in [0, 0.5)")
        if self.lam < 0:
            raise ConfigError(f"lam={self.lam}: must be >= 0")

    @property
    def beta_value(self) -> float:
        return self.beta or (2.0 if self.loss == "simpo" else 0.1)

    @property
    def uses_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


@dataclass(frozen=True)
class RewardConfig(_Tuned):
    """One reward-model run: the base plus a scalar head, trained on which side is chosen."""

    optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=1e-5, warmup_steps=10, weight_decay=0.0)
    )
    trainable: str = WITHOUT_LM_HEAD
    center_coef: float = 0.0  # TRL's center_rewards_coefficient
    name: str = "reward"

    def __post_init__(self):
        if self.lora is not None and self.trainable == WITHOUT_LM_HEAD:
            object.__setattr__(self, "trainable", "")
        super().__post_init__()
        if self.center_coef < 0:
            raise ConfigError(f"center_coef={self.center_coef}: must be >= 0 (0: off)")


def _dpo_loss(cfg: DPOConfig, model, params_of, reference):
    """``loss(params, frozen, batch, rng)`` of a DPO-family run; ``reference(frozen, batch)``
    gives the reference's summed log-probs ``[B, 2]`` (None: reference-free)."""
    beta = cfg.beta_value

    def loss(params, frozen, batch, rng):
        policy = params_of(params, frozen, rng)
        sums, counts, moe_aux = pair_logps(model, policy, batch, True, cfg.loop.ce_chunk)
        means = sums / jnp.maximum(counts, 1.0)
        scored = means if cfg.loss in AVERAGED else sums
        c, r = scored[:, 0], scored[:, 1]
        if cfg.loss == "simpo":
            value, m = simpo_loss(c, r, beta=beta, gamma=cfg.gamma)
        elif cfg.loss == "orpo":
            value, m = orpo_loss(c, r, -means[:, 0], lam=cfg.lam)
        else:
            ref = reference(frozen, batch)
            if cfg.loss in AVERAGED:
                ref = ref / jnp.maximum(counts, 1.0)
            value, m = preference_loss(
                c,
                r,
                ref[:, 0],
                ref[:, 1],
                loss_type=cfg.loss,
                beta=beta,
                label_smoothing=cfg.label_smoothing,
            )
        value, m = add_router_loss(model.config, moe_aux, value, m)
        m["num_tokens"] = real_tokens(batch)
        return value, m

    return loss


def _reward_loss(cfg: RewardConfig, model, params_of):
    """``loss(params, frozen, batch, rng)`` of a reward model, whose ``params`` are
    ``{"decoder": ..., "head": {"score": [D]}}``: Bradley-Terry on the two sides' scores."""

    def loss(params, frozen, batch, rng):
        rows = flat(batch)
        scores, moe_aux = sequence_scores(
            model,
            params_of(params["decoder"], frozen, rng),
            params["head"],
            rows["tokens"],
            positions=rows["positions"],
            segment_ids=rows["segment_ids"],
            return_aux=True,
        )
        pairs = as_pairs(scores)
        value, m = reward_model_loss(pairs[:, 0], pairs[:, 1], center_coef=cfg.center_coef)
        value, m = add_router_loss(model.config, moe_aux, value, m)
        m["num_tokens"] = real_tokens(batch)
        return value, m

    return loss


# --- tasks -----------------------------------------------------------------------------------------


def _identity(cfg: _Tuned, base, data, t, settings: dict) -> dict:
    return {
        "tokenizer_sha256": data.tokenizer.sha256,
        "data_fingerprint": data.fingerprint,
        "base": base.source["sha256"],
        "trainable": t.identity,
        "preference": settings,
    }


def _settings(cfg, names) -> dict:
    return {k: getattr(cfg, k) for k in names}


def dpo_task(cfg: DPOConfig, base, data, out_dir, log=print) -> Task:
    """The DPO ``Task``; with ``reference="cached"`` the reference log-probs are computed here."""
    from llmjax.inference.quantize import QuantizedModel

    model = base.model
    t = trainable(cfg, model, base.params)
    frozen, frozen_axes = dict(t.frozen), dict(t.frozen_axes)
    train_it = Unindexed(data.train)
    heldout = lambda b, n: without_index(data.heldout.batches(b, n))  # noqa: E731
    reference = None
    if cfg.uses_reference and cfg.reference == "cached":
        key = {
            "base": base.source["sha256"],
            "data_fingerprint": data.fingerprint,
            "quantize_base": cfg.quantize_base if cfg.lora else "",
            "quantize_keep": cfg.quantize_keep if cfg.quantize_base else "",
        }
        ref_model, ref_params = model, base.params
        if cfg.lora is not None and cfg.quantize_base:  # the policy's own start: quantized base
            ref_model, ref_params = QuantizedModel(model), frozen["base"]
        ref_axes = None if cfg.quantize_base and cfg.lora else model.param_axes()
        train_ref, held_ref = cached_reference(
            cfg, ref_model, ref_params, ref_axes, data, out_dir, key, log
        )
        train_it = WithReference(data.train, train_ref)

        def heldout(b, n):
            return (attach(x, held_ref) for x in data.heldout.batches(b, n))

        def reference(frozen, batch):
            return batch["ref_logps"]

    elif cfg.uses_reference:
        if cfg.lora is not None:  # the frozen base with the adapters off: no second copy
            ref_model = QuantizedModel(model) if cfg.quantize_base else model

            def reference(frozen, batch):
                base_params = jax.lax.stop_gradient(frozen["base"])
                return pair_logps(ref_model, base_params, batch, chunk=cfg.loop.ce_chunk)[0]

        else:
            # A copy: the policy's own arrays are donated to each step's update.
            frozen["reference"] = jax.tree.map(jnp.copy, base.params)
            frozen_axes["reference"] = model.param_axes()

            def reference(frozen, batch):
                ref_params = jax.lax.stop_gradient(frozen["reference"])
                return pair_logps(model, ref_params, batch, chunk=cfg.loop.ce_chunk)[0]

    settings = _settings(cfg, ("loss", "beta", "label_smoothing", "gamma", "lam", "reference"))
    t.log_count(log)
    return Task(
        params=t.initial,
        axes=t.axes,
        loss=_dpo_loss(cfg, model, t.params_of, reference),
        train=train_it,
        heldout=heldout,
        model=model.config,
        frozen=frozen,
        frozen_axes=frozen_axes,
        identity=_identity(cfg, base, data, t, settings),
        start_metrics=t.start_metrics,
        eval_perplexity=False,
    )


def reward_task(cfg: RewardConfig, base, data, log=print) -> Task:
    """The reward-model ``Task``: the decoder (or its adapters) and a scalar head train."""
    model = base.model
    t = trainable(cfg, model, base.params)
    head = init_score_head(model, jax.random.PRNGKey(cfg.loop.seed))
    decoder = t.initial
    initial = (
        (lambda key: {"decoder": decoder(key), "head": head})
        if callable(decoder)
        else {"decoder": decoder, "head": head}
    )

    count = t.count + model.config.d_model
    log(f"trainable parameters: {count:,} (a scalar head of {model.config.d_model} included)")
    return Task(
        params=initial,
        axes={"decoder": t.axes, "head": score_axes(model)},
        loss=_reward_loss(cfg, model, t.params_of),
        train=Unindexed(data.train),
        heldout=lambda b, n: without_index(data.heldout.batches(b, n)),
        model=model.config,
        frozen=t.frozen,
        frozen_axes=t.frozen_axes,
        identity={
            **_identity(cfg, base, data, t, _settings(cfg, ("center_coef",))),
            "head": "score",
        },
        start_metrics={"trainable_params": count, "fraction_trainable": count / t.total},
        eval_perplexity=False,
    )


# --- running ---------------------------------------------------------------------------------------


def prepare(cfg: _Tuned, out_dir, log=print):
    """The base, the data and the completed config of a run (its ``model`` from the base)."""
    base = load_base(cfg.base, cfg.scan_layers)
    cfg = dataclasses.replace(cfg, model=base.model.config, base=base.source["path"])
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is beyond the base model's max_seq_len="
            f"{cfg.model.max_seq_len}; lower --seq-len"
        )
    data = build_preference_data(cfg.data, base.tokenizer, cfg.model.vocab_size)
    keep_copy(data.tokenizer, out_dir, cfg.name)
    log(f"base: {base.source['kind']} {base.source['path']} ({base.model})")
    log(f"data: {data.description}")
    return cfg, base, data


def run(cfg: DPOConfig | RewardConfig, out_dir, log=print) -> TrainResult:
    """Train (or resume) a DPO-family policy or a reward model in ``out_dir``."""
    if not llmjax.distributed.is_main_process():
        log = lambda *a, **k: None  # noqa: E731  (process 0 speaks for the job)
    with rundir.hold(out_dir):
        cfg, base, data = prepare(cfg, out_dir, log)
        if isinstance(cfg, RewardConfig):
            t = reward_task(cfg, base, data, log)
        else:
            t = dpo_task(cfg, base, data, absolute(out_dir), log)
        result = train(cfg, t, out_dir, log=log)
    for k, v in result.eval_metrics.items():
        log(f"{k} {v:.4f}")
    return result


def evaluate_run(run, batch_size: int, max_batches: int | None = None) -> dict:
    """A finished DPO or reward run (``llmjax.runs.load_run``) on its own held-out pairs: the
    metrics of its last evaluation, the reference read again from the base's files."""
    from llmjax.train import evaluate, make_eval_step

    cfg = run.meta["config"]
    saved = {**cfg["data"], "batch_size": batch_size, "strict": False}
    data = build_preference_data(
        PreferenceDataConfig(**saved), run.tokenizer, run.model.config.vocab_size
    )
    model = run.model
    frozen = {}
    if run.head is not None:
        rm = RewardConfig(center_coef=cfg.get("center_coef", 0.0))

        def loss(params, frozen, batch, rng):
            rows = flat(batch)
            scores = sequence_scores(
                model,
                params,
                frozen["head"],
                rows["tokens"],
                positions=rows["positions"],
                segment_ids=rows["segment_ids"],
            )
            pairs = as_pairs(scores)
            return reward_model_loss(pairs[:, 0], pairs[:, 1], center_coef=rm.center_coef)

        frozen["head"] = run.head
    else:
        names = ("loss", "beta", "label_smoothing", "gamma", "lam")
        dpo = DPOConfig(**{k: cfg[k] for k in names})
        if dpo.uses_reference:
            # LoRA runs keep their base as trained; the others read it again.
            frozen["reference"] = (
                run.base_params
                if run.base_params is not None
                else load_base(cfg["base"], model.config.scan_layers).params
            )

        def reference(frozen, batch):
            return pair_logps(model, frozen["reference"], batch)[0]

        loss = _dpo_loss(dpo, model, lambda p, f, r=None: p, reference)
    step = jax.jit(make_eval_step(loss))
    batches = without_index(data.heldout.batches(batch_size, max_batches))
    result = evaluate(step, run.params, batches, frozen=frozen)
    return {"eval_loss": result.loss, "pairs": result.sequences, **result.metrics}
