"""Where numbers go: ``metrics.jsonl``, TensorBoard events and a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from llmjax.train.tensorboard import EventWriter


def _clean(v):
    v = float(v) if hasattr(v, "__float__") and not isinstance(v, bool | int) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the fact visible
    return v


class MetricsLog:
    """Appends one JSON object per logged step to ``<out>/metrics.jsonl`` and mirrors scalars to
    TensorBoard under ``<out>/tensorboard``.

    On resume from step ``s`` entries after ``s`` (written by the interrupted run, and about to be
    written again) are dropped, so the file reads as one uninterrupted run.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        resume_step: int = 0,
        tensorboard: bool = True,
        enabled: bool = True,
    ):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:  # another process writes this run's metrics
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [
                json.dumps(rec) for rec in _records(self.path) if rec.get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")  # noqa: SIM115  (kept open for the run)
        self._tb = EventWriter(Path(out_dir) / "tensorboard") if tensorboard else None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            nums = {k: v for k, v in rec.items() if k != "step" and isinstance(v, int | float)}
            self._tb.scalars(step, nums)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _records(path: Path) -> list[dict]:
    """The records of a metrics file; a line that is not a JSON object is skipped.

    A run killed while writing leaves its last line torn; a metrics file must never keep the
    run from resuming or a plot from being drawn.
    """
    out = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return _records(p)


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """One self-overwriting status line on a terminal, a plain line per update otherwise."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._first = None  # (step, time) of the first update: the rate excludes compilation

    def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._first is None:
            self._first = (step, now)
        done, elapsed = step - self._first[0], now - self._first[1]
        eta = (self.total - step) * elapsed / done if done > 0 else float("inf")
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        line = (
            f"[{bar}] step {step}/{self.total}  loss {loss:.4f}  "
            f"{tokens_per_sec:,.0f} tok/s  ETA {_duration(eta) if math.isfinite(eta) else '?'}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
