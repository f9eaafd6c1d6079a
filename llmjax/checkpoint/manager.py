"""Orbax checkpoints of the train state, with validation before anything is trusted.

Layout: ``<dir>/<step>/state`` (the pytree) and ``<dir>/<step>/meta`` (JSON: data-iterator state,
configs, tokenizer hash, eval loss). Orbax writes a step into a temporary directory and renames it
when complete, so a save killed midway leaves the earlier steps as they were. What it does not
catch is a step directory that exists but is incomplete or damaged (orbax counts a bare ``<step>``
directory as a checkpoint): ``restore_latest`` validates each candidate, newest first, warns about
and moves aside any it cannot restore, and falls back to the previous one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from llmjax.errors import CheckpointError, CheckpointMismatch

log = logging.getLogger(__name__)


def step_dirs(directory: str | Path) -> list[int]:
    """Integer-named step directories, newest first (complete or not)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(
        (int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True
    )


def looks_complete(step_dir: Path) -> str | None:
    """None if ``step_dir`` has every file a finished save writes, else what is missing."""
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        return "no _CHECKPOINT_METADATA (the save never finished)"
    for item in ("state", "meta"):
        if not (step_dir / item).is_dir():
            return f"no {item}/ item"
    if not (step_dir / "state" / "_METADATA").is_file():
        return "no state/_METADATA"
    return None


class Checkpointer:
    """Saves every step it is asked to; keeps the newest ``keep_last`` plus the best eval loss."""

    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        keep_best: bool = True,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        policies = [cm.LatestN(keep_last)]
        if keep_best:
            policies.append(
                cm.BestN(
                    get_metric_fn=lambda m: m["eval_loss"],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, meta: dict, eval_loss: float | None = None) -> None:
        """Start saving ``state`` (asynchronously) as ``step``; returns once arrays are copied."""
        metrics = None if eval_loss is None else {"eval_loss": float(eval_loss)}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_meta(step_dir: str | Path) -> dict:
    """The JSON metadata of one checkpoint without touching its arrays."""
    step_dir = Path(step_dir)
    with ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as mgr:
        return mgr.restore(
            int(step_dir.name), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )["meta"]


@contextlib.contextmanager
def _quiet_orphaned_reads(settle_s: float = 0.25, max_wait_s: float = 5.0):
    """Keep a failed restore from printing a traceback per array still being read.

    Orbax runs a restore on a fresh asyncio loop and closes it as soon as one read fails. The
    other tensorstore reads finish afterwards and try to wake that closed loop; each raises
    "Event loop is closed" on a tensorstore thread, which Python reports through
    ``sys.unraisablehook``: dozens of interleaved tracebacks after the one real error. Only
    those are swallowed (anything else goes to the previous hook), and only until the late
    reads have settled, so the hook is the caller's again when this returns.
    """
    previous = sys.unraisablehook
    last = [0.0]

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            last[0] = time.monotonic()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        start = last[0] = time.monotonic()
        while (now := time.monotonic()) - last[0] < settle_s and now - start < max_wait_s:
            time.sleep(settle_s / 5)
        raise
    finally:
        sys.unraisablehook = previous


def restore(step_dir: str | Path, abstract_state, partial: bool = False) -> tuple[dict, dict]:
    """``(state, meta)`` of one checkpoint, arrays placed as ``abstract_state``'s shardings say.

    With ``partial``, ``abstract_state`` may name a subset of the saved tree (e.g. only
    ``{"params": ...}``) and only those arrays are read: sampling from an 8B checkpoint then
    never allocates its two Adam moments.
    """
    step_dir = Path(step_dir)
    problem = looks_complete(step_dir)
    if problem:
        raise CheckpointError(f"{step_dir} is incomplete: {problem}")
    if partial:
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state
        )
        state_args = ocp.args.PyTreeRestore(
            abstract_state, restore_args=restore_args, partial_restore=True
        )
    else:
        state_args = ocp.args.StandardRestore(abstract_state)
    with (
        _quiet_orphaned_reads(),
        ocp.CheckpointManager(
            step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True)
        ) as mgr,
    ):
        out = mgr.restore(
            int(step_dir.name),
            args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()),
        )
    return out["state"], out["meta"]


def restore_latest(directory: str | Path, abstract_state, check=None, quarantine: bool = True):
    """``(step, state, meta)`` of the newest checkpoint that restores, or None if there is none.

    ``check(meta)`` may raise ``CheckpointMismatch`` when a checkpoint is sound but belongs to
    another configuration: that error propagates (nothing is moved), since falling back would
    silently restart a run the user meant to continue. Newer step directories that are damaged
    are moved to ``<step>.invalid-<time>`` (never deleted), so the resumed run can save those
    step numbers again.
    """
    bad = []
    result = None
    for step in step_dirs(directory):
        path = Path(directory) / str(step)
        try:
            problem = looks_complete(path)
            if problem:
                raise CheckpointError(f"incomplete: {problem}")
            meta = read_meta(path)
            if check is not None:
                check(meta)
            state, meta = restore(path, abstract_state)
        except CheckpointMismatch:
            raise
        except Exception as e:  # any other failure means "damaged": fall back to an older step
            warnings.warn(
                f"checkpoint {path} cannot be restored ({type(e).__name__}: "
                f"{str(e)[:300]}); falling back to the previous one",
                stacklevel=2,
            )
            bad.append(path)
            continue
        result = (step, state, meta)
        break
    if quarantine:
        for path in bad:
            dest = path.with_name(f"{path.name}.invalid-{int(time.time())}")
            shutil.move(str(path), str(dest))
            log.warning("moved unusable checkpoint %s to %s", path, dest)
    return result


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory from either a step directory or a run's checkpoint directory."""
    p = Path(path)
    if p.name.isdigit() and looks_complete(p) is None:
        return p
    for cand in (p, p / "checkpoints"):
        for step in step_dirs(cand):
            if looks_complete(cand / str(step)) is None:
                return cand / str(step)
    raise CheckpointError(f"no complete checkpoint in {p} (expected <dir>/<step>/ from a run)")
