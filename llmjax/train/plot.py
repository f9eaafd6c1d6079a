"""``llmjax plot DIR``: the training and held-out loss curves of a run as a PNG, and beside them
the reward curves of an RL run."""

from __future__ import annotations

import os
from pathlib import Path

from llmjax.train.metrics import read_metrics


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("llmjax plot needs matplotlib: pip install matplotlib") from e
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(
            f"{run_dir / 'metrics.jsonl'} does not exist (not a run directory?)"
        )
    recs = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in recs if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in recs if isinstance(r.get("eval_loss"), float)]
    if not train:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} has no logged training loss yet")
    rewards = [(r["step"], r["reward"]) for r in recs if isinstance(r.get("reward"), float)]
    held = [(r["step"], r["eval_reward"]) for r in recs if isinstance(r.get("eval_reward"), float)]
    # An RL run's loss says little (GRPO's starts near 0 and stays there): the reward is the curve.
    panels = 2 if rewards else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.2), dpi=120, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)" if not rewards else "loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        ax = axes[0][1]
        ax.plot(*zip(*rewards, strict=True), label="reward (sampled)", lw=1.2)
        if held:
            ax.plot(*zip(*held, strict=True), "o-", label="held-out reward (greedy)", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.set_title(f"{run_dir.name}: reward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out else run_dir / "loss.png"
    fig.savefig(out)
    plt.close(fig)
    return out
