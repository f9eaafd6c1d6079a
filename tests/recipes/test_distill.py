"""``llmjax distill`` end to end: the teacher stays frozen and out of the checkpoint, resume is
bit-exact with on-policy sampling, on-policy continuations are the student's own, the offline
top-k cache gives the online loss, and records (jsonl) distil with prompts taken from the data."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.cli import main
from llmjax.data import DataConfig, SFTDataConfig, teacher_cache
from llmjax.inference import rollout
from llmjax.recipes import distill
from llmjax.runs import load_run
from llmjax.train.metrics import read_metrics
from tests.recipes.hf_base import make_base, write_records
from tests.train.helpers import corpus_paths

STUDENT = ["--student", "llama3-tiny", "--set", "model.d_model=32", "--set", "model.n_layers=1"]
# A schedule that does not depend on loop.steps, so 3 steps then 3 more is a 6-step run.
COMMON = ["--batch-size", "4", "--seq-len", "32", "--lr", "3e-3"]
COMMON += ["--set", "optim.schedule=constant", "--set", "optim.warmup_steps=2"]
COMMON += ["--set", "loop.log_every=1", "--set", "loop.save_every=3", "--set", "loop.eval_every=3"]
COMMON += ["--set", "loop.eval_batches=2"]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("distill-tokens"))


def distil(teacher, out, data_cache, *extra) -> int:
    args = ["distill", "--teacher", str(teacher), "--data", *corpus_paths(), "--out", str(out)]
    return main([*args, *STUDENT, *COMMON, "--set", f"data.cache_dir={data_cache}", *extra])


def _digest(directory) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


ON_POLICY = ["--kind", "jsd", "--beta", "0.3", "--on-policy-fraction", "0.5", "--alpha", "0.2"]
ON_POLICY += ["--set", "prompt_len=24"]


def test_on_policy_run_resumes_bit_exactly_and_never_saves_the_teacher(
    trained_run, tmp_path, data_cache
):
    before = _digest(trained_run / "checkpoints")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert distil(trained_run, whole, data_cache, *ON_POLICY, "--steps", "6") == 0
    assert distil(trained_run, split, data_cache, *ON_POLICY, "--steps", "3") == 0
    assert distil(trained_run, split, data_cache, *ON_POLICY, "--steps", "6") == 0
    a, b = load_run(whole), load_run(split)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def steps(run):  # everything but the timing
        recs = [r for r in read_metrics(run) if "loss" in r]
        return {r["step"]: {k: v for k, v in r.items() if k != "tokens_per_sec"} for r in recs}

    assert steps(whole) == steps(split)
    recs = steps(whole)
    # Both sources of continuations were drawn, and each step logs TRL-style names.
    assert {recs[s]["on_policy"] for s in recs} == {0.0, 1.0}
    for r in recs.values():
        assert {"distill/kl", "distill/hard_loss", "distill/teacher_nll"} <= r.keys()
        assert 0 < r["completions/mean_length"] <= 9 if r["on_policy"] else True
    # The teacher is read, never written, and the checkpoint holds the student alone.
    assert _digest(trained_run / "checkpoints") == before
    manifest = json.loads((whole / "checkpoints" / "6" / "manifest.json").read_text())
    params = {k.split("/", 1)[1] for k in manifest["arrays"] if k.startswith("params/")}
    assert len(params) == len(jax.tree.leaves(a.params))
    moments = {k.split("/mu/", 1)[1] for k in manifest["arrays"] if "/mu/" in k}
    assert moments == params  # Adam's moments exist for the student's parameters alone
    assert a.model.num_params() < load_run(trained_run).model.num_params()
    start = read_metrics(whole)[0]
    assert start["step"] == 0 and start["student_params"] == a.model.num_params()


def test_resume_names_the_distillation_setting_that_changed(
    trained_run, tmp_path, data_cache, capsys
):
    out = tmp_path / "run"
    assert distil(trained_run, out, data_cache, "--kind", "jsd", "--steps", "1") == 0
    capsys.readouterr()
    assert distil(trained_run, out, data_cache, "--kind", "reverse_kl", "--steps", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kind was 'jsd', now 'reverse_kl'" in err[0], err


def _task(trained_run, tmp_path, data_cache, **settings):
    cfg = distill.DistillConfig(
        teacher=str(trained_run),
        student="llama3-tiny",
        model=llmjax.presets.get("llama3-tiny").replace(d_model=32, n_layers=1),
        data=DataConfig(paths=corpus_paths(), seq_len=32, batch_size=4, cache_dir=data_cache),
        **settings,
    )
    return cfg, distill.task(cfg, tmp_path, log=lambda *a: None)


def test_offline_cache_gives_the_online_top_k_loss(trained_run, tmp_path, data_cache):
    _, online = _task(trained_run, tmp_path / "a", data_cache, top_k=5, temperature=2.0)
    cache = tmp_path / "cache"
    _, offline = _task(
        trained_run, tmp_path / "b", data_cache, top_k=5, temperature=2.0, teacher_cache=str(cache)
    )
    assert offline.frozen == {} and "teacher" in online.frozen  # trains without the teacher
    params = jax.jit(online.params)(jax.random.PRNGKey(1))
    rng = jax.random.PRNGKey(2)
    for step in range(3):  # the cache follows the data iterator batch by batch
        b_on, b_off = next(online.train), next(offline.train)
        assert set(b_off) - set(b_on) == {"teacher_ids", "teacher_logits", "teacher_logz"}
        on = jax.jit(online.loss)(params, online.frozen, b_on, rng)
        off = jax.jit(offline.loss)(params, {}, b_off, rng)
        np.testing.assert_allclose(off[0], on[0], rtol=1e-6, err_msg=f"step {step}")
        np.testing.assert_allclose(off[1]["distill/kl"], on[1]["distill/kl"], rtol=1e-6)
    meta = teacher_cache.read_meta(cache)
    assert meta["written"] == 300 and meta["key"]["top_k"] == 5
    assert meta["key"]["top_k_rest"] == "bucket" and meta["key"]["temperature"] == 2.0
    # A resumed iterator reads the cache from where the checkpoint left it.
    state = offline.train.state()
    ids = next(offline.train)["teacher_ids"]
    offline.train.restore(state)
    np.testing.assert_array_equal(next(offline.train)["teacher_ids"], ids)


def test_on_policy_continuations_are_the_students_own(trained_run, tmp_path, data_cache):
    cfg, t = _task(
        trained_run, tmp_path, data_cache, on_policy_fraction=1.0, prompt_len=20, kind="jsd"
    )
    teacher = load_run(trained_run)
    student = llmjax.build(cfg.model.replace(vocab_size=teacher.model.config.vocab_size))
    params = jax.jit(t.params)(jax.random.PRNGKey(3))
    batch = {k: jnp.asarray(v) for k, v in next(t.train).items()}
    rng = jax.random.PRNGKey(4)
    pick = distill._continuations(cfg, student, teacher.model, stop_ids=())
    got, on, _ = jax.jit(pick)(params, t.frozen, batch, rng)
    assert on == 1.0
    key = jax.random.split(rng)[1]
    L, N = cfg.lengths()
    assert (L, N) == (20, 13)

    def sampled(model, p):
        lengths = jnp.full((4,), L, jnp.int32)
        r = rollout(model, p, batch["tokens"][:, :L], lengths, key, max_new=N, masked=False)
        return np.asarray(r.tokens_BN)

    mine, teachers = sampled(student, params), sampled(teacher.model, t.frozen["teacher"])
    np.testing.assert_array_equal(np.asarray(got["tokens"][:, :L]), batch["tokens"][:, :L])
    np.testing.assert_array_equal(np.asarray(got["targets"][:, L - 1 :]), mine[:, : 33 - L])
    assert (mine != teachers).any()
    mask = np.asarray(got["loss_mask"])
    assert (mask[:, : L - 1] == 0).all() and (mask[:, L - 1 :] == 1).all()


def test_teacher_cache_continues_a_partial_write_and_grows(tmp_path):
    key = {"teacher": "t", "data_fingerprint": "d", "top_k": 2, "batch_size": 2, "seq_len": 3}

    def batches():
        for i in range(100):
            yield {"tokens": np.full((2, 3), i)}

    calls = []

    def top(batch):
        calls.append(int(batch["tokens"][0, 0]))
        v = batch["tokens"][..., None] + np.arange(2)
        return v.astype(np.int32), v.astype(np.float32) / 10

    teacher_cache.build(tmp_path, key, 5, batches(), top, log=lambda *a: None)
    assert calls == [0, 1, 2, 3, 4]
    # A writer killed after its first flush: the steps after it are computed again.
    meta = teacher_cache.read_meta(tmp_path)
    (tmp_path / "cache.json").write_text(json.dumps({**meta, "written": 2}))
    calls.clear()
    teacher_cache.build(tmp_path, key, 5, batches(), top, log=lambda *a: None)
    assert calls == [2, 3, 4]
    calls.clear()
    teacher_cache.build(tmp_path, key, 8, batches(), top, log=lambda *a: None)  # grows
    assert calls == [5, 6, 7]
    ids = np.load(tmp_path / "ids.npy")
    assert ids.shape == (8, 2, 3, 2) and (ids[:, 0, 0, 0] == np.arange(8)).all()
    with pytest.raises(llmjax.errors.DataError, match="another setup"):
        teacher_cache.build(tmp_path, {**key, "top_k": 3}, 8, batches(), top)


def test_records_distil_with_on_policy_prompts_from_the_data(tmp_path):
    teacher = make_base(tmp_path / "teacher", seed=1)
    data = write_records(tmp_path / "sums.jsonl")
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher), "--student", "llama3-tiny", "--data", str(data)]
    args += ["--out", str(out), "--steps", "2", "--batch-size", "4", "--seq-len", "24"]
    args += ["--on-policy-fraction", "1", "--set", "max_new_tokens=6", "--set", "model.n_layers=1"]
    args += ["--set", "loop.eval_every=0"]
    assert main(args) == 0
    recs = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["on_policy"] == 1.0 and 0 < r["completions/mean_length"] <= 6 for r in recs)
    run = load_run(out)
    assert run.tokenizer.sha256 == llmjax.load_tokenizer(teacher).sha256
    # Prompts are the records' own: every token before the first scored target.
    cfg = distill.DistillConfig(
        teacher=str(teacher),
        student="llama3-tiny",
        model=run.model.config,
        data=SFTDataConfig(path=str(data), seq_len=24, batch_size=4, packing=False),
        on_policy_fraction=1.0,
        max_new_tokens=6,
    )
    t = distill.task(cfg, tmp_path / "again", log=lambda *a: None)
    batch = {k: jnp.asarray(v) for k, v in next(t.train).items()}
    teacher_model = llmjax.from_hf(teacher, param_dtype="float32")[0]
    pick = distill._continuations(cfg, run.model, teacher_model, stop_ids=())
    got, _, _ = jax.jit(pick)(run.params, t.frozen, batch, jax.random.PRNGKey(0))
    prompt_len = np.asarray(batch["loss_mask"]).argmax(1) + 1
    for b, n in enumerate(prompt_len):
        np.testing.assert_array_equal(got["tokens"][b, :n], batch["tokens"][b, :n])
        assert got["loss_mask"][b, : n - 1].sum() == 0 and got["loss_mask"][b, n - 1] == 1
    assert dataclasses.asdict(cfg)["data"]["path"] == str(data)
