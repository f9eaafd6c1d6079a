"""Scalar heads: hidden states from apply, the last-token rule, and parity with transformers'
``...ForSequenceClassification`` (fp32, 1e-4) through from_hf_scorer and to_hf_scorer."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.errors import HFCheckpointError, InputError
from llmjax.interop.hf_config import UnsupportedConfig
from llmjax.interop.hf_score import from_hf_scorer, to_hf_scorer
from llmjax.scalar_head import init_score_head, score_axes, sequence_scores
from tests.hf_util import build_hf, torch, transformers

TOL = 1e-4
PAD = 0
SCORERS = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",  # sliding window 5 < the batch's length
    "qwen3": "Qwen3ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}
LENGTHS = [9, 5, 12, 1]  # the batch's real lengths; T = 12


def padded_batch(lengths=LENGTHS, T=12, left=(), seed=0):
    """Tokens (PAD outside each row's sequence, never inside) and the matching 0/1 mask."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), T), PAD, np.int32)
    mask = np.zeros((len(lengths), T), np.int32)
    for b, n in enumerate(lengths):
        where = slice(T - n, T) if b in left else slice(0, n)
        tokens[b, where] = rng.integers(1, 97, n)
        mask[b, where] = 1
    return tokens, mask


def random_params(model, seed=0):
    """Parameters drawn on the host: model.init compiles for seconds, and no test here needs it."""
    rng = np.random.default_rng(seed)
    draw = lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype)  # noqa: E731
    return jax.tree.map(draw, model.abstract_params())


def hf_scores(hf_model, tokens, mask):
    with torch.no_grad():
        out = hf_model(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask))
    return out.logits[:, 0].float().numpy()


@pytest.fixture(scope="module", params=sorted(SCORERS))
def scorer_dir(request, tmp_path_factory):
    family = request.param
    overrides = {"n_layer": 2} if family == "gpt2" else {"num_hidden_layers": 2}
    hf = build_hf(family, cls=SCORERS[family], num_labels=1, pad_token_id=PAD, **overrides)
    path = tmp_path_factory.mktemp(family) / "scorer"
    hf.save_pretrained(path)
    return family, hf, path


def test_scores_match_transformers_and_round_trip(scorer_dir, tmp_path):
    family, hf, path = scorer_dir
    model, params, head = from_hf_scorer(path)
    assert "lm_head" not in params and head["score"].shape == (model.config.d_model,)
    # Rows 0 and 2 padded on the right, 1 and 3 on the left: the rule reads the rightmost real token.
    tokens, mask = padded_batch(left=(1, 3))
    want = hf_scores(hf, tokens, mask)
    got = np.asarray(sequence_scores(model, params, head, tokens, attention_mask=mask))
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    out = to_hf_scorer(model, params, head, tmp_path / "out", pad_token_id=PAD)
    back = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(back).__name__ == SCORERS[family] and back.config.num_labels == 1
    np.testing.assert_allclose(hf_scores(back, tokens, mask), got, atol=TOL, rtol=0)
    model2, params2, head2 = from_hf_scorer(out)
    assert model2.config == model.config
    assert jax.tree.structure((params, head)) == jax.tree.structure((params2, head2))
    for a, b in zip(
        jax.tree.leaves((params, head)), jax.tree.leaves((params2, head2)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hidden_states_unembed_to_the_logits():
    model = llmjax.build("llama3-tiny")
    params = random_params(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, model.config.vocab_size)
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 7 + [0] * 3])
    pos = jnp.array([list(range(6)) + list(range(4)), list(range(10))])
    hidden, logits = jax.jit(
        lambda p: (
            model.apply(p, tokens, segment_ids=seg, positions=pos, return_hidden=True),
            model.apply(p, tokens, segment_ids=seg, positions=pos),
        )
    )(params)
    assert hidden.shape == (2, 10, model.config.d_model) and hidden.dtype == jnp.float32
    unembedded = jnp.einsum("BTD,DV->BTV", hidden, params["lm_head"])
    np.testing.assert_allclose(unembedded, logits, atol=1e-5, rtol=0)

    # No [B, T, V] value anywhere in the computation, not only in its output.
    V = model.config.vocab_size
    fn = lambda p, t: model.apply(p, t, return_hidden=True)  # noqa: E731
    assert jax.eval_shape(fn, model.abstract_params(), tokens).shape == (2, 10, 64)
    jaxpr = jax.make_jaxpr(fn)(model.abstract_params(), tokens)
    shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert not any(len(s) == 3 and s[-1] == V for s in shapes)


def test_scores_read_the_last_real_token_and_differentiate():
    model = llmjax.build("qwen3-tiny")  # tied embeddings: params have no lm_head at all
    params = random_params(model)
    head = init_score_head(model, jax.random.key(1))
    assert jax.tree.structure(score_axes(model), is_leaf=lambda x: isinstance(x, tuple)) == (
        jax.tree.structure(head)
    )
    tokens, mask = padded_batch(lengths=[7, 3], T=10)
    junk = np.where(mask == 1, tokens, 5)  # other tokens in the padding

    @jax.jit
    def all_scores(params, head):
        score = lambda t, **kw: sequence_scores(model, params, head, t, **kw)  # noqa: E731
        return jnp.stack(
            [
                score(tokens, attention_mask=mask),
                score(junk, segment_ids=mask),
                score(junk, last_index_B=jnp.array([6, 2])),
                score(junk),  # without marks the last slot is read: the padding now counts
            ]
        )

    scores = all_scores(params, head)
    np.testing.assert_allclose(scores[1], scores[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores[2], scores[0], atol=1e-6, rtol=0)
    assert not np.allclose(scores[3], scores[0], atol=1e-4)

    def loss(p, h):
        return jnp.sum(sequence_scores(model, p, h, tokens, attention_mask=mask) ** 2)

    g_params, g_head = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, head)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((g_params, g_head)))
    assert float(jnp.abs(g_head["score"]).sum()) > 0

    with pytest.raises(InputError, match="last_index_B must lie in"):
        sequence_scores(model, params, head, tokens, last_index_B=np.array([3, 10]))
    with pytest.raises(InputError, match="init_score_head"):
        sequence_scores(model, params, {"w": head["score"]}, tokens)


def test_apply_without_lm_head_asks_for_hidden_states():
    model = llmjax.build("llama3-tiny")
    params = dict(model.abstract_params())
    del params["lm_head"]
    tokens = jnp.zeros((1, 4), jnp.int32)
    fn = lambda p: model.apply(p, tokens, return_hidden=True)  # noqa: E731
    assert jax.eval_shape(fn, params).shape == (1, 4, model.config.d_model)
    with pytest.raises(InputError, match="return_hidden=True"):
        jax.eval_shape(lambda p: model.apply(p, tokens), params)


def test_bad_checkpoints_name_the_fix(tmp_path):
    lm = tmp_path / "lm"
    build_hf("llama", num_hidden_layers=1).save_pretrained(lm)
    with pytest.raises(HFCheckpointError, match=r"no score.weight; load it with llmjax.from_hf"):
        from_hf_scorer(lm)

    scorer = tmp_path / "scorer"
    shutil.copytree(lm, scorer)
    (scorer / "model.safetensors").unlink()
    hf = build_hf("llama", cls=SCORERS["llama"], num_hidden_layers=1, num_labels=1, pad_token_id=0)
    hf.save_pretrained(scorer)
    with pytest.raises(UnsupportedConfig, match="from_hf_scorer"):
        llmjax.from_hf(scorer)

    config = json.loads((scorer / "config.json").read_text())
    config["id2label"] = {"0": "bad", "1": "good"}
    (scorer / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match="2 labels; a scalar head has one"):
        from_hf_scorer(scorer)

    model = llmjax.build("llama3-tiny")
    params, head = random_params(model), init_score_head(model, jax.random.key(1))
    with pytest.raises(InputError, match="pad_token_id must be a token id"):
        to_hf_scorer(model, params, head, tmp_path / "out", pad_token_id=None)
    assert not (tmp_path / "out").exists()
