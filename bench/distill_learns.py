"""Distillation learns: held-out perplexity of a teacher, a student trained from scratch, and the
same student distilled from the teacher with each kind, same steps and data, each run by the
command a user types.

The teacher is a 3.7M-parameter Llama pretrained by ``llmjax pretrain``; the student is the
default recipe's 1.05M-parameter Llama (the same initial weights in every run). The corpus is
tinyshakespeare.txt beside the repository, else the Python standard library's own sources.

    python bench/distill_learns.py --out runs/distill-bench --jobs 2   # ~1 hour on 2 CPU cores

Finished runs are reused (each command resumes or reports its run complete). The last printed
line is one JSON object; ``gap closed`` is (scratch - distilled) / (scratch - teacher) perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEACHER = ["--set", "model.d_model=256", "--set", "model.mlp_dim=768"]
# The default recipe's model (llama3-stdlib) as a preset plus overrides; the vocabulary is the
# teacher's. Every run: 300 steps of 8 x 256 tokens, lr 3e-3 cosine, seed 0.
STUDENT = ["--student", "llama3-tiny", "--set", "model.d_model=128", "--set", "model.n_layers=4"]
STUDENT += ["--set", "model.mlp_dim=384"]
KINDS = {  # the row's name: (its run directory, the flags)
    "forward KL": ("forward-kl", ["--kind", "forward_kl"]),
    "reverse KL": ("reverse-kl", ["--kind", "reverse_kl"]),
    "JSD (beta 0.5)": ("jsd", ["--kind", "jsd", "--beta", "0.5"]),
    "top-16 offline, rest bucket": (
        "top16-bucket",
        ["--top-k", "16", "--teacher-cache", "{out}/cache-top16-bucket"],
    ),
    "top-16 offline, renormalized": (
        "top16-renormalize",
        ["--top-k", "16", "--teacher-cache", "{out}/cache-top16-renormalize"]
        + ["--set", "top_k_rest=renormalize"],
    ),
    "on-policy JSD (lambda 0.5)": (
        "on-policy-jsd",
        ["--kind", "jsd", "--on-policy-fraction", "0.5"],
    ),
}


def corpus() -> list[str]:
    if SHAKESPEARE.is_file():
        return [str(SHAKESPEARE)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(stdlib.glob("*.py"))[:60]]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmjax.cli", *args]


def perplexity(run: Path) -> float:
    from llmjax.train.metrics import read_metrics

    evals = [r for r in read_metrics(run) if "eval_loss" in r]
    return math.exp(evals[-1]["eval_loss"])


def finished(run: Path, steps: int = 300) -> bool:
    """A run that logged its final evaluation is reused as it is."""
    from llmjax.train.metrics import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return False
    return any(r.get("step") == steps and "eval_loss" in r for r in read_metrics(run))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/distill-bench", help="where the runs go")
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--jobs", type=int, default=1, help="distillation runs at once")
    p.add_argument("--only", choices=list(KINDS), action="append", help="run only these kinds")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = corpus()
    teacher = out / "teacher"
    seconds = {}
    t0 = time.perf_counter()
    cmd = command("pretrain", "--data", *data, "--out", str(teacher), *TEACHER)
    subprocess.run([*cmd, "--steps", str(args.teacher_steps)], check=True)
    seconds["teacher"] = time.perf_counter() - t0
    tokenizer = next((teacher / "tokenizer").glob("*.model"))
    jobs = {"scratch": command("pretrain", "--data", *data, "--tokenizer", str(tokenizer))}
    jobs["scratch"] += ["--out", str(out / "scratch")]
    for name, (directory, extra) in KINDS.items():
        if args.only and name not in args.only:
            continue
        run = out / directory
        extra = [e.format(out=out) for e in extra]
        jobs[name] = command("distill", "--teacher", str(teacher), "--data", *data)
        jobs[name] += ["--out", str(run), *STUDENT, *extra]
    runs = {name: Path(cmd[cmd.index("--out") + 1]) for name, cmd in jobs.items()}
    pending, active = [name for name in jobs if not finished(runs[name])], {}
    while pending or active:
        while pending and len(active) < args.jobs:
            name = pending.pop(0)
            print(" ".join(jobs[name][2:]).replace("llmjax.cli", "llmjax"), flush=True)
            log = open(runs[name].with_suffix(".log"), "w")  # noqa: SIM115
            active[name] = (subprocess.Popen(jobs[name], stdout=log, stderr=log), time.time())
        for name, (proc, start) in list(active.items()):
            if proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"{name} failed; see {runs[name].with_suffix('.log')}")
                seconds[name] = time.time() - start
                del active[name]
        time.sleep(1)
    ppl = {"teacher": perplexity(teacher)}
    ppl.update({name: perplexity(run) for name, run in runs.items()})
    gap = ppl["scratch"] - ppl["teacher"]
    print(f"{'run':<30}{'perplexity':>11}{'gap closed':>12}{'seconds':>9}")
    results = {}
    for name, value in ppl.items():
        closed = (ppl["scratch"] - value) / gap if name not in ("teacher", "scratch") else None
        results[name] = {"perplexity": value, "gap_closed": closed}
        shown = f"{100 * closed:.1f}%" if closed is not None else "-"
        print(f"{name:<30}{value:>11.3f}{shown:>12}{seconds.get(name, float('nan')):>9.0f}")
    summary = {"results": results, "seconds": seconds}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
