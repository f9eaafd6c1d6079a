"""llmjax against MaxText on one training shape, side by side in one run: tokens/s and their ratio.

Each round runs ``bench/train_step.py`` (llmjax's loop step) and MaxText's own pretraining
trainer on synthetic data with the same model: a Llama-style decoder, d 256, 4 layers, 4 heads of
64, MLP 1024, seq 256, batch 8, vocab 32000, float32 (MaxText's default vocabulary), dot-product
attention, the layers scanned and each one rematerialised in the backward pass (MaxText's
defaults, ``scan_layers=true`` and ``remat_policy=full``, set on both sides). Rounds alternate the
two so that a machine's drift (other jobs, thermal state) falls on both. MaxText's step time is
the median of its log's ``completed step: N, seconds: S`` after the first two steps (compilation
and warm-up).

MaxText needs Python >= 3.12 and is a peer, never a dependency of llmjax; install it in its own
environment and pass that interpreter:

    python3.12 -m venv mt && mt/bin/pip install "maxtext[tpu]==0.2.5"
    python bench/maxtext_side_by_side.py --maxtext-python mt/bin/python --rounds 2

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"d_model": 256, "layers": 4, "heads": 4, "head_dim": 64, "mlp": 1024}
SHAPE |= {"seq_len": 256, "batch_size": 8, "vocab": 32000}
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


def run_llmjax(steps: int) -> dict:
    s = SHAPE
    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py")]
    cmd += ["--d-model", str(s["d_model"]), "--layers", str(s["layers"])]
    cmd += ["--heads", str(s["heads"]), "--mlp", str(s["mlp"]), "--vocab", str(s["vocab"])]
    cmd += ["--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch_size"])]
    cmd += ["--dtype", "float32", "--steps", str(steps), "--layout", "scanned", "--remat", "full"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return {"step_time_s": r["step_time_s"], "tokens_per_sec": r["tokens_per_sec"]}


def run_maxtext(python: str, steps: int) -> dict:
    s = SHAPE
    where = "import maxtext, os; print(os.path.dirname(maxtext.__file__))"
    pkg = subprocess.run([python, "-c", where], check=True, capture_output=True, text=True)
    base_yml = Path(pkg.stdout.strip()) / "configs" / "base.yml"
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, "-m", "maxtext.trainers.pre_train.train", str(base_yml)]
        cmd += ["run_name=side_by_side", f"base_output_directory={out}", "hardware=cpu"]
        cmd += ["dataset_type=synthetic", f"steps={steps + 2}", "enable_checkpointing=false"]
        cmd += [f"base_emb_dim={s['d_model']}", f"base_num_query_heads={s['heads']}"]
        cmd += [f"base_num_kv_heads={s['heads']}", f"head_dim={s['head_dim']}"]
        cmd += [f"base_mlp_dim={s['mlp']}", f"base_num_decoder_layers={s['layers']}"]
        cmd += [f"max_target_length={s['seq_len']}", f"per_device_batch_size={s['batch_size']}"]
        cmd += ["attention=dot_product", "dtype=float32", "enable_goodput_recording=false"]
        cmd += ["monitor_goodput=false", "skip_jax_distributed_system=true"]
        cmd += ["scan_layers=true", "remat_policy=full"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True)
    steps_s = [(int(n), float(t)) for n, t in STEP_LINE.findall(log.stdout + log.stderr)]
    times = [t for n, t in steps_s if n >= 2]
    if not times:
        raise SystemExit("MaxText printed no 'completed step' lines after step 1")
    step_s = statistics.median(times)
    return {"step_time_s": round(step_s, 4), "tokens_per_sec": round(_tokens() / step_s, 1)}


def _tokens() -> int:
    return SHAPE["batch_size"] * SHAPE["seq_len"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--maxtext-python", required=True, help="a Python >= 3.12 with maxtext")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    args = p.parse_args(argv)
    rounds = []
    for i in range(args.rounds):
        ours = run_llmjax(args.steps)
        peer = run_maxtext(args.maxtext_python, args.steps)
        ratio = ours["tokens_per_sec"] / peer["tokens_per_sec"]
        rounds.append({"llmjax": ours, "maxtext": peer, "ratio": round(ratio, 3)})
        print(
            f"round {i + 1}: llmjax {ours['tokens_per_sec']:,.0f} tokens/s "
            f"({ours['step_time_s']:.3f} s/step), MaxText {peer['tokens_per_sec']:,.0f} tokens/s "
            f"({peer['step_time_s']:.3f} s/step): {ratio:.2f}x",
            flush=True,
        )
    median = statistics.median(r["ratio"] for r in rounds)
    print(f"llmjax / MaxText tokens/s, median of {len(rounds)} rounds: {median:.2f}x")
    summary = {"shape": SHAPE, "rounds": rounds, "ratio_median": round(median, 3)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
