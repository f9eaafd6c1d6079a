"""Bad-input rows for ``llmjax distill``: the teacher and student, their tokenizers, the kinds and
their settings, the offline cache. Each fails before any training step runs; the teacher is the
shared pretraining run."""

from __future__ import annotations

from tests.bad_inputs import Cli, Env


def _distill(env: Env, *extra: str, teacher=None, student="llama3-tiny", data=None) -> list[str]:
    teacher = str(env.run) if teacher is None else teacher
    data = list(env.corpus) if data is None else [data]
    out = str(env.tmp / "out")
    return [
        "distill",
        "--teacher",
        teacher,
        "--student",
        student,
        "--data",
        *data,
        "--out",
        out,
        "--steps",
        "1",
        "--seq-len",
        "32",
        *extra,
    ]


def _other_tokenizer(env: Env) -> str:
    """The shared run's export with another tokenizer (a byte-level BPE) beside its weights."""
    from tests.recipes.hf_base import make_tokenizer

    hf = env.copy(env.hf, "student")
    (hf / "tokenizer.model").unlink()
    make_tokenizer(hf)
    return str(hf)


CASES = [
    Cli(
        "distill teacher missing",
        lambda e: _distill(e, teacher=str(e.tmp / "nowhere")),
        "no such file or directory",
    ),
    Cli("distill student unknown", lambda e: _distill(e, student="llama9-huge"), "unknown preset"),
    Cli(
        "distill student with another tokenizer",
        lambda e: _distill(e, student=_other_tokenizer(e)),
        "different tokenizers",
    ),
    Cli(
        "distill model override on a loaded student",
        lambda e: _distill(e, "--set", "model.d_model=16", student=str(e.hf)),
        "model.* overrides shape a preset student",
    ),
    Cli("distill unknown kind", lambda e: _distill(e, "--set", "kind=kl"), "expected one of"),
    Cli(
        "distill jsd beta out of range",
        lambda e: _distill(e, "--kind", "jsd", "--beta", "1.5"),
        "must lie in (0, 1)",
    ),
    Cli(
        "distill top-k with reverse kl",
        lambda e: _distill(e, "--kind", "reverse_kl", "--top-k", "8"),
        "forward KL against the teacher's top-k",
    ),
    Cli(
        "distill cache without top-k",
        lambda e: _distill(e, "--teacher-cache", str(e.tmp / "c")),
        "give --top-k K",
    ),
    Cli(
        "distill cache with on-policy",
        lambda e: _distill(
            e, "--top-k", "4", "--on-policy-fraction", "0.5", "--teacher-cache", str(e.tmp / "c")
        ),
        "cannot score new continuations",
    ),
    Cli(
        "distill on-policy fraction above one",
        lambda e: _distill(e, "--on-policy-fraction", "1.5"),
        "a probability in [0, 1]",
    ),
    Cli(
        "distill prompt longer than the row",
        lambda e: _distill(e, "--seq-kd", "--set", "prompt_len=40"),
        "do not fit rows of data.seq_len=32",
    ),
    Cli(
        "distill seq_len beyond the models",
        lambda e: _distill(e, "--seq-len", "100000"),
        "max_seq_len",
    ),
    Cli(
        "distill on-policy over packed records",
        lambda e: _distill(
            e,
            "--on-policy-fraction",
            "0.5",
            "--set",
            "data.packing=true",
            data=e.write("r.jsonl", '{"prompt": "a", "completion": " b"}\n'),
        ),
        "set data.packing=false",
    ),
    Cli(
        "distill several jsonl files",
        lambda e: _distill(e, "--data", e.write("a.jsonl", "{}\n")),
        "give one .jsonl file",
    ),
]
