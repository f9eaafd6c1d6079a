"""Mixture of experts against dense: held-out loss of the ``tiny-shakespeare`` recipe's model and
of the same model with every MLP replaced by 8 experts of half the width, top-2 (equal active
parameters), with and without the balancing loss, each run by the command a user types.

    python bench/moe_learns.py --out runs/moe-bench   # ~45 minutes on one CPU core

The corpus is tinyshakespeare.txt beside the repository, else the Python standard library's own
sources. Every run: 300 steps of 8 x 256 tokens, lr 3e-3 cosine, seed 0, the dense run's
tokenizer. Finished runs are reused. For the mixtures, the held-out loss is the cross-entropy
alone: the logged ``eval_loss`` less ``router_aux_coef`` times the logged balance loss.
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
STEPS = 300
MOE = ["--set", "model.n_experts=8", "--set", "model.experts_per_token=2"]
MOE += ["--set", "model.expert_mlp_dim=192"]  # 2 x 192 = the dense MLP's 384
AUX_COEF = 0.01
RUNS = {  # row: (run directory, flags, router_aux_coef)
    "dense": ("dense", [], 0.0),
    f"MoE 8 x top-2, router_aux_coef={AUX_COEF}": (
        "moe-balanced",
        [*MOE, "--set", f"model.router_aux_coef={AUX_COEF}"],
        AUX_COEF,
    ),
    "MoE 8 x top-2, no balancing loss": ("moe", MOE, 0.0),
}


def corpus() -> list[str]:
    if SHAKESPEARE.is_file():
        return [str(SHAKESPEARE)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [str(p) for p in sorted(stdlib.glob("*.py"))[:60]]


def evals(run: Path, aux_coef: float) -> list[dict]:
    from llmjax.train.metrics import read_metrics

    if not (run / "metrics.jsonl").is_file():
        return []
    rows = [r for r in read_metrics(run) if "eval_loss" in r]
    for r in rows:
        r["cross_entropy"] = r["eval_loss"] - aux_coef * r.get("eval_moe/balance_loss", 0.0)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = corpus()
    table = {}
    for row, (name, flags, coef) in RUNS.items():
        run = out / name
        if not any(r["step"] == STEPS for r in evals(run, coef)):
            tok = (
                []
                if name == "dense"
                else ["--tokenizer", *(out / "dense" / "tokenizer").glob("*.model")]
            )
            cmd = [sys.executable, "-m", "llmjax.cli", "pretrain", "--recipe", "tiny-shakespeare",
                   "--data", *data, *map(str, tok), "--out", str(run), "--steps", str(STEPS), *flags]  # fmt: skip
            start = time.time()
            subprocess.run(cmd, check=True)
            print(f"{row}: {time.time() - start:.0f} s", flush=True)
        rows = evals(run, coef)
        table[row] = {
            "cross_entropy": [round(r["cross_entropy"], 4) for r in rows],
            "perplexity": round(math.exp(rows[-1]["cross_entropy"]), 2),
            "balance_loss": rows[-1].get("eval_moe/balance_loss"),
        }
    print("| run | held-out loss at each eval | perplexity | balance loss |")
    print("|---|---|---|---|")
    for row, r in table.items():
        losses = " / ".join(f"{x:.3f}" for x in r["cross_entropy"])
        bal = "-" if r["balance_loss"] is None else f"{r['balance_loss']:.3f}"
        print(f"| {row} | {losses} | {r['perplexity']:.1f} | {bal} |")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
